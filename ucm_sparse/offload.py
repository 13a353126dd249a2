"""GSA offload mode: the full KV in pinned host memory (the store's Cache tier), a GPU budget of hot pieces.

The unit of residency is a piece: one (block, KV head) of one layer, its K then V (``2 * block_size * head_dim``
values), because GSA selects per KV head. Per layer:

* :class:`HostKV` holds every piece in one pinned buffer adopted by the store's :class:`CacheTier` (pinned there
  against eviction), addressed by ``host_block * num_kv_heads + head``; host blocks are handed out per request.
* :class:`HotPool` holds ``gpu_budget_blocks * num_kv_heads`` pieces on the device with LRU replacement: each
  slot keeps a stamp, ``2 * step`` when a step reads it and ``2 * step - 1`` when the step's prefetch predicts
  it; a miss takes a free slot or the one with the oldest stamp that the current step does not read. The pieces
  of each request's newest (partial) block are pinned: they are written there first and copied to the host
  when the block fills.
* Block representations of every host block stay on the device (selection reads them, never the host).

A decode step (``plan`` once, then ``run`` per layer) writes the new token into its pinned piece, computes the
representation of a block that just filled and copies it to the host, selects exactly as on-device GSA does,
brings in the selected pieces that are not resident (a synchronous miss, counted), and attends over the pool
with a per-(request, KV head) block table. The outputs equal on-device GSA's over the same tokens bit for bit
(tests/test_gsa_offload.py on the torch backend; bench/bench_gsa_offload.py reports it for the Triton kernels).

Prefetch (``prefetch_ahead`` > 0): a layer's selection at step s predicts its selections at steps s+1 ..
s+prefetch_ahead. ``plan`` hands the predicted pieces that are not resident (evicted under budget pressure, or a
request that was not scheduled for a while) to ``prefetch_workers`` threads, with at most ``max_pending_prefetch``
blocks' worth of pieces (``max_pending_prefetch * num_kv_heads``) in flight; ``run`` of a layer cancels its jobs
that have not started and waits for the others, so a late prefetch costs the layer no more than a miss. Stats in
:class:`OffloadStats`. Budgets count blocks' worth of pieces: ``gpu_budget_blocks`` is
``gpu_budget_blocks * num_kv_heads`` pieces per layer.
"""
import threading
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ucm_store.backends.cache import CacheTier
from ucm_store.pipeline import block_key
from ucm_store.pool import PinnedMemoryPool

from . import ops
from .config import GSAConfig
from .ops import Selection
from .prefetch import FetchJob, Prefetcher

NEVER = -1  # stamp of a slot that holds nothing
FOREVER = torch.iinfo(torch.int64).max


@dataclass
class OffloadStats:
    """Counters of one :class:`OffloadedGSA`; pieces are (block, KV head, layer) units of ``piece_bytes``."""

    piece_bytes: int
    steps: int = 0
    tokens: int = 0  # decode tokens (one per request per step)
    needed: int = 0  # pieces attention read
    sync_misses: int = 0  # needed pieces fetched synchronously at attention time
    prefetched: int = 0  # pieces brought in by the prefetcher
    prefetch_cancelled: int = 0  # pieces of prefetch jobs cancelled because attention came first
    h2d_bytes: int = 0
    d2h_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of the needed pieces already on the device at attention time."""
        return 1.0 - self.sync_misses / self.needed if self.needed else 1.0

    @property
    def pcie_bytes_per_token(self) -> float:
        return (self.h2d_bytes + self.d2h_bytes) / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {**vars(self), "hit_rate": self.hit_rate,
                "pcie_bytes_per_token": self.pcie_bytes_per_token}


class HostKV:
    """Every layer's pieces in pinned host memory adopted by a :class:`CacheTier`, and the host block allocator."""

    def __init__(self, cache: CacheTier, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype: torch.dtype):
        self.cache, self.num_blocks, self.num_kv_heads = cache, num_blocks, num_kv_heads
        self.piece_numel = 2 * block_size * head_dim
        self._keys, self._rows = [], []
        nbytes = num_blocks * num_kv_heads * self.piece_numel * dtype.itemsize
        for layer in range(num_layers):
            key = block_key(f"ucm_sparse.offload/{uuid.uuid4().hex}/{layer}".encode())
            buf = cache.allocate(nbytes)
            if not cache.adopt(key, buf, pinned=True):
                cache.pool.release(buf)
                raise RuntimeError(f"Cache tier already holds key {key}")
            self._keys.append(key)
            self._rows.append(buf.view(dtype).view(num_blocks * num_kv_heads, self.piece_numel))
        self._free = list(range(num_blocks - 1, -1, -1))

    def rows(self, layer: int) -> torch.Tensor:
        """``[num_blocks * num_kv_heads, 2 * block_size * head_dim]`` pieces of ``layer`` (K then V)."""
        return self._rows[layer]

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"host KV full: all {self.num_blocks} host blocks are in use (raise host_blocks)")
        return self._free.pop()

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)

    def close(self) -> None:
        """Give the buffers back to the Cache tier's pool."""
        for key in self._keys:
            self.cache.unpin(key)
            self.cache.remove(key)
        self._keys, self._rows = [], []


class HotPool:
    """One layer's device slots of pieces: LRU replacement, pinned slots, the host piece -> slot map."""

    def __init__(self, capacity: int, host_pieces: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.capacity = capacity
        self.kv = torch.empty(capacity, 2, block_size, 1, head_dim, dtype=dtype, device=device)
        self.slot_of = torch.full((host_pieces,), -1, dtype=torch.int64, device=device)
        self.piece_in = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.stamp = torch.full((capacity,), NEVER, dtype=torch.int64, device=device)
        self.pinned = torch.zeros(capacity, dtype=torch.bool, device=device)

    @property
    def key_cache(self) -> torch.Tensor:  # [capacity, block_size, 1, head_dim]
        return self.kv[:, 0]

    @property
    def value_cache(self) -> torch.Tensor:
        return self.kv[:, 1]

    @property
    def rows(self) -> torch.Tensor:  # [capacity, 2 * block_size * head_dim]
        return self.kv.view(self.capacity, -1)

    def evictable(self, below: int) -> int:
        """Slots that are not pinned and stamped below ``below`` (one host read)."""
        return int(((~self.pinned) & (self.stamp < below)).sum())

    def assign(self, pieces: torch.Tensor, below: int, stamp: int) -> torch.Tensor:
        """Slots for ``pieces`` (distinct, absent) among the :meth:`evictable` ones, free ones first then the
        oldest stamps; they get ``stamp``. The caller checked there are enough."""
        keys = torch.where((~self.pinned) & (self.stamp < below), self.stamp, FOREVER)
        slots = torch.topk(keys, pieces.numel(), largest=False).indices
        old = self.piece_in[slots]
        self.slot_of[old[old >= 0]] = -1
        self.piece_in[slots] = pieces
        self.slot_of[pieces] = slots
        self.stamp[slots] = stamp
        return slots

    def drop(self, pieces: torch.Tensor) -> None:
        """Forget ``pieces`` (a finished request, a cancelled prefetch): their slots become free."""
        slots = self.slot_of[pieces]
        slots = slots[slots >= 0]
        self.piece_in[slots] = -1
        self.stamp[slots] = NEVER
        self.pinned[slots] = False
        self.slot_of[pieces] = -1


@dataclass
class _Request:
    blocks: list[int]  # host block of each logical block
    seq_len: int  # tokens written
    written: set = field(default_factory=set)  # layers whose prompt was written
    predictions: dict = field(default_factory=dict)  # layer -> (step, selected pieces [heads, width], -1 padded)


@dataclass
class OffloadPlan:
    """One decode step of :class:`OffloadedGSA`, shared by every layer."""

    step: int
    request_ids: list
    seq_lens: torch.Tensor  # [batch] int32, tokens including the one this step writes
    block_table: torch.Tensor  # [batch, max_blocks] int32 host block ids
    counts: list[int]
    dense: bool
    tail_pieces: torch.Tensor  # [batch * num_kv_heads] host pieces of each request's newest block
    tail_offsets: torch.Tensor  # [batch * num_kv_heads] the new token's position in that block
    tail_is_new: torch.Tensor  # [batch * num_kv_heads] the new token opens its block (nothing on the host yet)
    filled: torch.Tensor  # [batch * num_kv_heads] bool: the new token fills its block
    any_filled: bool
    selections: dict = field(default_factory=dict)
    prefetches: list = field(default_factory=list)  # the FetchJobs this step queued (job.done is an Event)


class OffloadedGSA:
    """GSA over a KV cache kept in pinned host memory, with a GPU budget of hot pieces (see the module doc).

    Args:
        config: GSA settings; uses sparse_ratio, windows, score, token_budget, gpu_budget_blocks (pieces:
            ``gpu_budget_blocks * num_kv_heads`` per layer), prefetch_workers, prefetch_ahead (0: no prefetch),
            max_pending_prefetch (pieces in flight: ``max_pending_prefetch * num_kv_heads``).
        num_layers, num_kv_heads, head_dim, block_size, dtype: the KV geometry.
        host_blocks: host blocks per layer (all requests together).
        device: where attention runs (default: CUDA when available).
        cache: the store's Cache tier to hold the host KV (default: a private one over the process pool).
        backend: as for :class:`ucm_sparse.GSA`.
    """

    def __init__(self, config: GSAConfig, *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 host_blocks: int, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 cache: CacheTier | None = None, backend: str = "auto"):
        ops.check_backend(backend)
        if config.rerank_candidates > 1:
            raise ValueError(f"rerank_candidates: got {config.rerank_candidates}; the offload mode selects in one "
                             "stage (1) for now")
        if config.select_every != 1:
            raise ValueError(f"select_every: got {config.select_every}; the offload mode selects at every step (1) "
                             "for now, reuse is on-device GSA's (ucm_sparse.GSA, vLLM)")
        self.config, self.block_size, self.num_kv_heads, self.backend = config, block_size, num_kv_heads, backend
        self.dtype, self.device = dtype, _resolve_device(device)
        if cache is None:
            cache = CacheTier(num_layers, PinnedMemoryPool.get_instance())
        self.host = HostKV(cache, num_layers, host_blocks, num_kv_heads, block_size, head_dim, dtype)
        pieces = host_blocks * num_kv_heads
        self.pools = [HotPool(config.gpu_budget_blocks * num_kv_heads, pieces, block_size, head_dim, dtype,
                              self.device) for _ in range(num_layers)]
        self.reprs = [ops.empty_reprs(host_blocks, num_kv_heads, head_dim, dtype, config, self.device)
                      for _ in range(num_layers)]
        self._scratch = [ops.empty_reprs(pool.capacity, 1, head_dim, dtype, config, self.device) for pool in self.pools]
        self.requests: dict[Hashable, _Request] = {}
        self.stats = OffloadStats(piece_bytes=self.host.piece_numel * dtype.itemsize)
        self.prefetcher = (Prefetcher(config.prefetch_workers, config.max_pending_prefetch * num_kv_heads,
                                      self._prefetch_job) if config.prefetch_ahead > 0 else None)
        self._jobs: dict[int, list[FetchJob]] = {}
        self._worker_streams = threading.local()
        self._step = 0

    # ---- requests --------------------------------------------------------------------------------------------
    def write_prompt(self, request_id: Hashable, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a new request's prompt K/V of one layer (``[tokens, num_kv_heads, head_dim]`` each) on the
        host and compute its full blocks' representations. Every layer gets the same number of tokens."""
        tokens = keys.shape[0]
        for name, tensor in (("keys", keys), ("values", values)):
            if tensor.dim() != 3 or tensor.shape[0] < 1 or tensor.shape[1] != self.num_kv_heads \
                    or tensor.dtype != self.dtype:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} dtype {tensor.dtype}, expected [tokens, "
                                 f"{self.num_kv_heads}, head_dim] of {self.dtype}")
        request = self.requests.get(request_id)
        if request is None:
            request = self.requests[request_id] = _Request([self.host.allocate() for _ in
                                                            range(-(-tokens // self.block_size))], tokens)
        if tokens != request.seq_len or layer in request.written or values.shape != keys.shape:
            raise ValueError(f"write_prompt({request_id!r}, layer {layer}): {tokens} tokens (values "
                             f"{tuple(values.shape)}); expected {request.seq_len} like the other layers, "
                             "once per layer")
        blocks = _as_blocks(keys, values, self.block_size)  # [nb, 2, block_size, heads, head_dim]
        host = torch.tensor(request.blocks, dtype=torch.int64)
        pieces = (host[:, None] * self.num_kv_heads + torch.arange(self.num_kv_heads)).flatten()
        self.host.rows(layer).index_copy_(0, pieces, blocks.permute(0, 3, 1, 2, 4).reshape(pieces.numel(), -1).cpu())
        full = tokens // self.block_size
        key_blocks = blocks[:, 0].to(self.device)
        scratch = ops.empty_reprs(len(host), self.num_kv_heads, keys.shape[2], keys.dtype, self.config, self.device)
        ids = torch.arange(full, device=self.device)
        ops.update_reprs(ops.resolve_backend(self.backend, key_blocks), key_blocks, ids, scratch)
        for target, source in zip(self.reprs[layer], scratch):
            target[host[:full].to(self.device)] = source[:full]
        request.written.add(layer)

    def finish(self, request_id: Hashable) -> None:
        """Forget a request: its host blocks and device slots are free again."""
        self._drain()
        request = self.requests.pop(request_id)
        pieces = self._pieces(request.blocks)
        for pool in self.pools:
            pool.drop(pieces)
        self.host.release(request.blocks)

    def close(self) -> None:
        """Stop the prefetch workers and give the host KV back to the Cache tier."""
        self._drain()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.host.close()

    def __enter__(self) -> "OffloadedGSA":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- a decode step ---------------------------------------------------------------------------------------
    def plan(self, request_ids: Sequence[Hashable]) -> OffloadPlan:
        """Plan the next decode step of these requests (each writes one token) and start prefetching."""
        self._drain()
        if len(set(request_ids)) != len(request_ids):
            raise ValueError(f"request_ids: {list(request_ids)!r} repeats an id")
        requests = [self._ready(request_id) for request_id in request_ids]
        for request in requests:
            if request.seq_len % self.block_size == 0:
                request.blocks.append(self.host.allocate())
            request.seq_len += 1
        self._step += 1
        self.stats.steps += 1
        self.stats.tokens += len(requests)
        plan = self._make_plan(list(request_ids), requests)
        if self.prefetcher is not None:
            plan.prefetches = self._start_prefetch(requests)
        return plan

    def run(self, plan: OffloadPlan, layer: int, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """Write this step's token (``key``/``value`` ``[batch, num_kv_heads, head_dim]``) and attend with ``q``
        ``[batch, num_q_heads, head_dim]``; returns ``[batch, num_q_heads, head_dim]`` in q's dtype."""
        if plan.step != self._step:
            raise ValueError(f"plan is from step {plan.step}; the latest plan is step {self._step}")
        batch, heads = len(plan.request_ids), self.num_kv_heads
        for name, tensor in (("key", key), ("value", value)):
            if tuple(tensor.shape) != (batch, heads, q.shape[2]) or tensor.device != self.device:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} on {tensor.device}, expected "
                                 f"[{batch}, {heads}, {q.shape[2]}] on {self.device}")
        backend = ops.resolve_backend(self.backend, q)
        self._finish_jobs(layer)
        tail_slots = self._write_token(plan, layer, key, value)
        self._complete_filled(plan, layer, backend, tail_slots)
        reprs = self.reprs[layer]
        if plan.dense or not self.config.sparse_layer(layer):
            selection = ops.full_selection(plan.seq_lens, heads, self.block_size, plan.block_table.shape[1])
        else:
            selection = ops.select(backend, q, reprs, plan.block_table, plan.seq_lens, self.config, self.block_size)
        plan.selections[layer] = selection
        slots, listed = self._resident(plan, layer, selection)
        out = self._attend(plan, self.pools[layer], q, selection, slots, listed, backend, scale)
        if self.prefetcher is not None:
            self._remember(plan, layer, selection, listed)
        return out

    def _attend(self, plan: OffloadPlan, pool: HotPool, q: torch.Tensor, selection: Selection, slots: torch.Tensor,
                listed: torch.Tensor, backend: str, scale: float | None) -> torch.Tensor:
        """Attention over the pool: each (request, KV head) is one row with its own logical -> slot table."""
        batch, heads, width = selection.sel_idx.shape
        rows, max_blocks = batch * heads, plan.block_table.shape[1]
        table = torch.zeros(rows, max_blocks + 1, dtype=torch.int32, device=self.device)  # last column: unlisted
        columns = torch.where(listed, selection.sel_idx, max_blocks).reshape(rows, width).long()
        table.scatter_(1, columns, torch.where(listed, slots, 0).reshape(rows, width).int())
        per_row = Selection(selection.sel_idx.reshape(rows, 1, width), selection.sel_count.reshape(rows, 1))
        out = ops.attend(backend, q.reshape(rows, q.shape[1] // heads, q.shape[2]), pool.key_cache, pool.value_cache,
                         table[:, :max_blocks], plan.seq_lens.repeat_interleave(heads), per_row, scale)
        return out.reshape(q.shape)

    # ---- internals -------------------------------------------------------------------------------------------
    def _ready(self, request_id: Hashable) -> _Request:
        request = self.requests.get(request_id)
        if request is None or len(request.written) != len(self.pools):
            raise ValueError(f"request {request_id!r}: write_prompt() every layer first")
        return request

    def _pieces(self, blocks: Sequence[int]) -> torch.Tensor:
        host = torch.tensor(blocks, dtype=torch.int64, device=self.device)
        return (host[:, None] * self.num_kv_heads + torch.arange(self.num_kv_heads, device=self.device)).flatten()

    def _make_plan(self, request_ids: list, requests: list[_Request]) -> OffloadPlan:
        nbs = [len(r.blocks) for r in requests]
        table = torch.zeros(len(requests), max(nbs), dtype=torch.int32)
        for row, request in enumerate(requests):
            table[row, :len(request.blocks)] = torch.tensor(request.blocks, dtype=torch.int32)
        counts = [ops.num_selected(nb, self.config, self.block_size) for nb in nbs]
        lens = torch.tensor([r.seq_len for r in requests], dtype=torch.int64)
        offsets = (lens - 1) % self.block_size
        tails = torch.tensor([r.blocks[-1] for r in requests], dtype=torch.int64)
        heads = self.num_kv_heads

        def per_head(values: torch.Tensor) -> torch.Tensor:  # one entry per (request, KV head), on the device
            return values.repeat_interleave(heads).to(self.device)

        return OffloadPlan(
            self._step, request_ids, lens.int().to(self.device), table.to(self.device), counts,
            dense=all(c == nb for c, nb in zip(counts, nbs)),
            tail_pieces=(tails[:, None] * heads + torch.arange(heads)).flatten().to(self.device),
            tail_offsets=per_head(offsets), tail_is_new=per_head(offsets == 0),
            filled=per_head(lens % self.block_size == 0), any_filled=bool((lens % self.block_size == 0).any()))

    def _write_token(self, plan: OffloadPlan, layer: int, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Make each request's newest block resident and pinned, write the token into it; return its slots."""
        pool = self.pools[layer]
        slots = pool.slot_of[plan.tail_pieces]
        absent = slots < 0
        present = slots[~absent]
        pool.pinned[present] = True
        pool.stamp[present] = self._now
        if bool(absent.any()):
            fetch = absent & ~plan.tail_is_new
            new_slots = self._take_slots(pool, plan.tail_pieces[absent])
            slots[absent] = new_slots
            if bool(fetch.any()):
                self._copy_in(layer, plan.tail_pieces[fetch], slots[fetch])
                self.stats.sync_misses += int(fetch.sum())
        pool.pinned[slots] = True
        pool.kv[slots, 0, plan.tail_offsets, 0] = key.reshape(-1, key.shape[-1]).to(pool.kv.dtype)
        pool.kv[slots, 1, plan.tail_offsets, 0] = value.reshape(-1, value.shape[-1]).to(pool.kv.dtype)
        return slots

    def _complete_filled(self, plan: OffloadPlan, layer: int, backend: str, tail_slots: torch.Tensor) -> None:
        """For blocks the new token filled: representations from the pool, copy to the host, unpin."""
        if not plan.any_filled:
            return
        filled = plan.filled
        pool = self.pools[layer]
        slots, pieces = tail_slots[filled], plan.tail_pieces[filled]
        scratch = self._scratch[layer]
        ops.update_reprs(backend, pool.key_cache, slots, scratch)
        for target, source in zip(self.reprs[layer], scratch):
            target.flatten(0, 1)[pieces] = source.flatten(0, 1)[slots]  # a piece is one (block, KV head)
        rows = pool.rows[slots].cpu()
        self.host.rows(layer).index_copy_(0, pieces.cpu(), rows)
        self.stats.d2h_bytes += rows.numel() * rows.element_size()
        pool.pinned[slots] = False

    def _resident(self, plan: OffloadPlan, layer: int, selection: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``[batch, heads, width]`` of the selected pieces, fetching the missing ones; and the listed mask."""
        pool = self.pools[layer]
        batch, heads, width = selection.sel_idx.shape
        entry = torch.arange(width, device=self.device)
        listed = (entry < selection.sel_count[..., None]) & (selection.sel_idx >= 0)
        logical = torch.where(listed, selection.sel_idx, 0).long()
        host = plan.block_table.long().gather(1, logical.view(batch, heads * width)).view(batch, heads, width)
        pieces = host * heads + torch.arange(heads, device=self.device)[None, :, None]
        slots = torch.where(listed, pool.slot_of[pieces], 0)
        missing = listed & (slots < 0)
        pool.stamp[slots[listed & ~missing]] = self._now  # what this step reads is not evicted by its misses
        misses = int(missing.sum())
        if misses:
            wanted = pieces[missing]
            new_slots = self._take_slots(pool, wanted)
            self._copy_in(layer, wanted, new_slots)
            slots[missing] = new_slots
            self.stats.sync_misses += misses
        self.stats.needed += int(listed.sum())
        return slots, listed

    @property
    def _now(self) -> int:
        """The stamp of what the current step reads (predictions of it get one less)."""
        return 2 * self._step

    def _take_slots(self, pool: HotPool, pieces: torch.Tensor) -> torch.Tensor:
        available = pool.evictable(self._now)
        if available < pieces.numel():
            raise ValueError(f"gpu_budget_blocks={self.config.gpu_budget_blocks}: this step needs "
                             f"{pieces.numel()} more pieces on the device but only {available} slots can be "
                             f"reused; raise gpu_budget_blocks (or lower sparse_ratio / the batch)")
        return pool.assign(pieces, self._now, self._now)

    def _copy_in(self, layer: int, pieces: torch.Tensor, slots: torch.Tensor) -> None:
        """Synchronous host -> pool copy of ``pieces`` into ``slots`` (on the caller's stream)."""
        rows = self._gather(layer, pieces.cpu())
        self.pools[layer].rows.index_copy_(0, slots, rows.to(self.device))
        self.stats.h2d_bytes += pieces.numel() * self.stats.piece_bytes

    def _gather(self, layer: int, pieces: torch.Tensor) -> torch.Tensor:
        """Host rows of ``pieces`` (CPU int64) in one new tensor, pinned when the device is a GPU."""
        host = self.host.rows(layer)
        rows = torch.empty(pieces.numel(), host.shape[1], dtype=host.dtype, pin_memory=self.device.type == "cuda")
        return torch.index_select(host, 0, pieces, out=rows)

    def _remember(self, plan: OffloadPlan, layer: int, selection: Selection, listed: torch.Tensor) -> None:
        """Keep each request's selected pieces of this layer as the prediction of its next steps (no host sync:
        rows of the batch tensors, -1 where nothing is listed)."""
        heads = self.num_kv_heads
        host = plan.block_table.long().gather(1, torch.where(listed, selection.sel_idx, 0).long().flatten(1))
        pieces = host.view(listed.shape) * heads + torch.arange(heads, device=self.device)[None, :, None]
        pieces = torch.where(listed, pieces, -1)
        for row, request_id in enumerate(plan.request_ids):
            self.requests[request_id].predictions[layer] = (self._step, pieces[row])

    def _start_prefetch(self, requests: list[_Request]) -> list[FetchJob]:
        """Queue, layer by layer, the live predicted pieces that are not resident; return the jobs."""
        oldest, predicted = self._step - self.config.prefetch_ahead, self._now - 1
        for layer, pool in enumerate(self.pools):
            live = [p[1] for r in requests if (p := r.predictions.get(layer)) is not None and p[0] >= oldest]
            if not live:
                continue
            pieces = torch.unique(torch.cat([p.flatten() for p in live]))
            pieces = pieces[pieces >= 0]
            slots = pool.slot_of[pieces]
            pool.stamp[slots[slots >= 0]] = predicted  # keep the resident part of the prediction
            pieces = pieces[slots < 0][:pool.evictable(predicted)]
            if pieces.numel():  # this step's misses may still take them, after everything older
                slots = pool.assign(pieces, predicted, predicted)
                after = torch.cuda.current_stream(self.device).record_event() if self.device.type == "cuda" else None
                chunk = self.prefetcher.max_pending
                self._jobs[layer] = [FetchJob(layer, pieces[i:i + chunk].cpu(), slots[i:i + chunk], after)
                                     for i in range(0, pieces.numel(), chunk)]
                for job in self._jobs[layer]:
                    self.prefetcher.submit(job)
        return [job for jobs in self._jobs.values() for job in jobs]

    def _prefetch_job(self, job: FetchJob) -> None:
        """Worker side: gather the pieces on the host, copy them to the device, wait until they landed."""
        rows = self._gather(job.layer, job.units)
        target = self.pools[job.layer].rows
        if self.device.type != "cuda":
            target.index_copy_(0, job.slots, rows)
            return
        stream = getattr(self._worker_streams, "stream", None)
        if stream is None:
            stream = self._worker_streams.stream = torch.cuda.Stream(self.device)
        stream.wait_event(job.after)  # slots may still be read by attention queued before the plan
        with torch.cuda.stream(stream):
            target.index_copy_(0, job.slots, rows.to(self.device, non_blocking=True))
        stream.synchronize()

    def _finish_jobs(self, layer: int) -> None:
        """Before a layer attends: cancel its prefetch jobs not started, wait for the others."""
        for job in self._jobs.pop(layer, []):
            if self.prefetcher.finish(job):
                self.stats.prefetched += job.size
                self.stats.h2d_bytes += job.size * self.stats.piece_bytes
            else:
                self.pools[layer].drop(job.units.to(self.device))
                self.stats.prefetch_cancelled += job.size

    def _drain(self) -> None:
        for layer in list(self._jobs):
            self._finish_jobs(layer)


def _resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` (CUDA when available if None) with a CUDA index filled in, so it compares equal to tensors'."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _as_blocks(keys: torch.Tensor, values: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[tokens, heads, dim]`` K and V as ``[blocks, 2, block_size, heads, dim]`` (the last block zero-padded)."""
    tokens, heads, dim = keys.shape
    blocks = -(-tokens // block_size)
    out = keys.new_zeros(blocks * block_size, 2, heads, dim)
    out[:tokens, 0], out[:tokens, 1] = keys, values
    return out.view(blocks, block_size, 2, heads, dim).transpose(1, 2)
