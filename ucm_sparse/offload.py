"""GSA offload mode: the full KV in pinned host memory (the store's Cache tier), a GPU budget of hot pieces.

The unit of residency is a piece: one (block, KV head) of one layer (``ucm_sparse.hot_pool``), because GSA selects
per KV head. Per layer, :class:`~ucm_sparse.hot_pool.HostKV` holds every piece on the host and
:class:`~ucm_sparse.hot_pool.HotPool` ``capacity`` pieces on the device (``gpu_budget_bytes`` over the layers, or
``gpu_budget_blocks * num_kv_heads`` per layer), evicting the least recently read. The pieces of each request's
newest (partial) block are pinned there: they are written on the device first and copied to the host when the
block fills. Block representations of every host block stay on the device (selection reads them, never the host).

A decode step (``plan`` once, then ``run`` per layer) writes the new token into its pinned piece, computes the
representation of a block that just filled and copies it to the host, selects exactly as on-device GSA does
(``select_every`` included, :class:`ucm_sparse.reuse.RequestReuse`), gives the selected pieces that are not
resident a slot and copies them in (a synchronous miss, counted), and attends over the pool with a per-(request,
KV head) block table. On a GPU all of it is queued without a host sync: misses are
found, slotted and copied by kernels reading the pinned host rows in place (``ucm_kernels.residency``, four
launches a layer, which also write the token when no block opens or fills in the step); the host only checks, at
``plan``, that the budget holds the step. The outputs equal on-device GSA's over the same tokens
bit for bit (tests/sparse/test_gsa_offload.py; bench/bench_gsa_offload.py reports it on the GPU).

Prefetch (``prefetch_ahead`` > 0): a layer's selection at step s predicts its selections at steps s+1 ..
s+prefetch_ahead. ``plan`` admits the predicted pieces of the requests that did not run in the previous step (a
request that ran has its last selection resident; at most ``max_pending_prefetch`` of them a step, the most recently
run first) and copies them on a stream of its own with ``16 * prefetch_workers`` copy programs, layer by layer, so
the copies of later layers overlap the attention of earlier ones; ``run`` of a layer waits for that layer's copies
only.
Stats in :class:`OffloadStats`.
"""
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ucm_kernels._utils import check_positive_int, evenly_strided_rows, padded_width
from ucm_kernels.staging import HostStaging
from ucm_store import CacheTier, PinnedMemoryPool

from . import ops
from .config import GSAConfig
from .hot_pool import HostKV, HotPool
from .ops import Selection
from .reuse import RequestReuse, ReuseStep

SYNC_COPY_PROGRAMS = 256  # copy programs of the misses a layer waits for
# select_every > 1: reused lists are kept at the block-table width rounded up to a multiple of this, so a longer
# request changes it (and every row reselects) once per REUSE_WIDTH_BLOCKS blocks, not whenever it opens a block
REUSE_WIDTH_BLOCKS = 1024
PROGRAMS_PER_PREFETCH_WORKER = 16


@dataclass
class OffloadStats:
    """Counters of one :class:`OffloadedGSA`; pieces are (block, KV head, layer) units of ``piece_bytes``."""

    piece_bytes: int
    steps: int = 0
    tokens: int = 0  # decode tokens (one per request per step)
    needed: int = 0  # pieces attention read
    sync_misses: int = 0  # needed pieces fetched synchronously at attention time
    prefetched: int = 0  # pieces brought in by the prefetch
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


@dataclass
class _Request:
    blocks: list[int]  # host block of each logical block
    seq_len: int  # tokens written
    written: set = field(default_factory=set)  # layers whose prompt was written
    tail_resident: bool = False  # its newest block is pinned in the pools (after a decode step wrote into it)
    last_step: int = -1  # the last step that decoded it
    last_row: int = -1  # its row in that step's batch (its selections are that row of the step's)
    row: torch.Tensor | None = None  # blocks as a CPU int32 tensor with room to grow (blocks added in place)
    serial: int = field(default_factory=itertools.count().__next__)  # never reused: (serial, blocks) names a row

    def add_block(self, block: int) -> None:
        """Append host ``block`` as the newest logical block."""
        self.blocks.append(block)
        if self.row is not None:
            if self.row.numel() < len(self.blocks):  # grown by doubling: a step converts no Python list
                self.row = torch.cat([self.row, torch.empty_like(self.row)])
            self.row[len(self.blocks) - 1] = block

    def block_row(self) -> torch.Tensor:
        """``blocks`` as ``[n]`` int32."""
        if self.row is None:
            self.row = torch.tensor(self.blocks, dtype=torch.int32)
        return self.row[:len(self.blocks)]


@dataclass
class OffloadPlan:
    """One decode step of :class:`OffloadedGSA`, shared by every layer."""

    step: int
    request_ids: list
    seq_lens: torch.Tensor  # [batch] int32, tokens including the one this step writes
    row_seq_lens: torch.Tensor  # [batch * num_kv_heads] int32: seq_lens per (request, KV head) row
    block_table: torch.Tensor  # [batch, max_blocks] int32 host block ids
    counts: list[int]
    dense: bool
    tail_pieces: torch.Tensor  # [batch * num_kv_heads] host pieces of each request's newest block
    tail_offsets: torch.Tensor  # [batch * num_kv_heads] the new token's position in that block
    tails_resident: bool  # every newest block is in the pools already (no slot to find)
    new_tail_pieces: torch.Tensor  # pieces of blocks this token opens (nothing on the host to copy)
    filled_rows: torch.Tensor  # [n_filled] int64 entries of tail_pieces whose block this token fills
    filled_count: torch.Tensor  # [1] int32 n_filled, on the device
    selections: dict = field(default_factory=dict)  # layer -> Selection; with reuse, may view the kept lists
    prefetch_done: dict = field(default_factory=dict)  # layer -> CUDA event after its prefetch copies
    launch_plans: dict = field(default_factory=dict)  # selection's and attention's, made by a shape's first layer
    reuse: ReuseStep | None = None  # each request's slot and whether it selects afresh (select_every > 1 only)
    table_width: int = 0  # the width the reused lists are kept at (select_every > 1 only)


class OffloadedGSA:
    """GSA over a KV cache kept in pinned host memory, with a GPU budget of hot pieces (see the module doc).

    Args:
        config: GSA settings; uses sparse_ratio, windows, score, token_budget, select_every, gpu_budget_bytes or
            gpu_budget_blocks, prefetch_workers, prefetch_ahead (0: no prefetch), max_pending_prefetch.
        num_layers, num_kv_heads, head_dim, block_size, dtype: the KV geometry.
        host_blocks: host blocks per layer (all requests together).
        device: where attention runs (default: CUDA when available).
        cache: the store's Cache tier to hold the host KV (default: a private one over the process pool); its
            pool must be pinned for a CUDA device.
        backend: as for :class:`ucm_sparse.GSA`.
    """

    def __init__(self, config: GSAConfig, *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 host_blocks: int, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 cache: CacheTier | None = None, backend: str = "auto"):
        ops.check_backend(backend)
        _check_one_stage(config)
        for name, size in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                           ("block_size", block_size), ("host_blocks", host_blocks)):
            check_positive_int(name, size)
        self.config, self.block_size, self.num_kv_heads, self.backend = config, block_size, num_kv_heads, backend
        self.dtype, self.device = dtype, _resolve_device(device)
        if cache is None:
            cache = CacheTier(num_layers, PinnedMemoryPool.get_instance())
        self.host = HostKV(cache, num_layers, host_blocks, num_kv_heads, block_size, head_dim, dtype)
        _check_reachable(self.host, self.device)
        piece_bytes = self.host.piece_numel * dtype.itemsize
        self.budget_key, capacity = _budget(config, num_layers, num_kv_heads, piece_bytes)
        pool_backend = ops.resolve_backend(backend, torch.empty(0, dtype=dtype, device=self.device))
        self.pools = [HotPool(capacity, host_blocks * num_kv_heads, block_size, head_dim, dtype, self.device,
                              pool_backend) for _ in range(num_layers)]
        self.reprs = [ops.empty_reprs(host_blocks, num_kv_heads, head_dim, dtype, config, self.device)
                      for _ in range(num_layers)]
        self._scratch = [ops.empty_reprs(capacity, 1, head_dim, dtype, config, self.device) for _ in self.pools]
        self.requests: dict[Hashable, _Request] = {}
        self._counters = _Counters(piece_bytes, self.device)
        self._staging = HostStaging(self.device)
        self._selected: dict[int, dict[int, torch.Tensor]] = {}  # step -> layer -> its selected pieces (prefetch)
        self._prefetch_stream = (torch.cuda.Stream(self.device) if config.prefetch_ahead > 0
                                 and self.device.type == "cuda" else None)
        self._step = 0
        self._table: tuple[tuple, torch.Tensor] | None = None  # the last plan's table on the device, and its rows
        self._reuse = RequestReuse(config.select_every, block_size)

    @property
    def capacity(self) -> int:
        """Pieces each layer keeps on the device."""
        self._check_open()
        return self.pools[0].capacity

    @property
    def stats(self) -> OffloadStats:
        """The counters so far (reads the device's tallies: one sync)."""
        return self._counters.snapshot()

    # ---- requests --------------------------------------------------------------------------------------------
    def write_prompt(self, request_id: Hashable, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a new request's prompt K/V of one layer (``[tokens, num_kv_heads, head_dim]`` each) on the
        host and compute its full blocks' representations. Every layer gets the same number of tokens."""
        self._check_open()
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
        pieces = self._pieces(request.blocks, "cpu")
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
        """Forget a request: its host blocks and device slots are free again (after the device's queued copies of
        them have landed)."""
        self._check_open()
        request = self.requests.pop(request_id)
        self._reuse.finish(request_id)
        pieces = self._pieces(request.blocks, self.device)
        for pool in self.pools:
            pool.drop(pieces)
        self._synchronize()
        self.host.release(request.blocks)

    def close(self) -> None:
        """Give the host KV back to the Cache tier and free the device pools and summaries (after the device's
        queued work); later calls raise RuntimeError. Closing again does nothing."""
        if self.pools:
            self._synchronize()
            self.host.close()
            self.pools, self.reprs, self._scratch, self._table, self._selected = [], [], [], None, {}

    def __enter__(self) -> "OffloadedGSA":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- a decode step ---------------------------------------------------------------------------------------
    def plan(self, request_ids: Sequence[Hashable]) -> OffloadPlan:
        """Plan the next decode step of these requests (each writes one token) and start prefetching."""
        self._check_open()
        if len(set(request_ids)) != len(request_ids):
            raise ValueError(f"request_ids: {list(request_ids)!r} repeats an id")
        requests = [self._ready(request_id) for request_id in request_ids]
        opens = [r.seq_len % self.block_size == 0 for r in requests]  # this token starts a new block
        counts = [ops.num_selected(len(r.blocks) + o, self.config, self.block_size) for r, o in zip(requests, opens)]
        self._check_budget(requests, counts)
        opened = []
        for request, opens_block in zip(requests, opens):
            if opens_block:
                request.add_block(self.host.allocate())
                request.tail_resident = False
                opened.append(request.blocks[-1])
            request.seq_len += 1
        self._step += 1
        plan = self._make_plan(list(request_ids), requests, opened, counts)
        if self.config.select_every > 1 and not plan.dense:  # a dense step selects nothing: the next reselects
            plan.table_width = -(-plan.block_table.shape[1] // REUSE_WIDTH_BLOCKS) * REUSE_WIDTH_BLOCKS
            plan.reuse = self._reuse.step(plan.request_ids, [r.seq_len for r in requests], plan.table_width,
                                          self.device)
        self._counters.steps += 1
        self._counters.tokens += len(requests)
        if self.config.prefetch_ahead > 0:
            self._prefetch(plan, [r for r in requests if r.last_step < self._step - 1])
            for step in [s for s in self._selected if s < self._step - self.config.prefetch_ahead]:
                del self._selected[step]  # no request's prediction from then is live any more
        for row, request in enumerate(requests):
            request.tail_resident = request.seq_len % self.block_size != 0
            request.last_step, request.last_row = self._step, row
        return plan

    def run(self, plan: OffloadPlan, layer: int, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
            scale: float | None = None) -> torch.Tensor:
        """Write this step's token (``key``/``value`` ``[batch, num_kv_heads, head_dim]``) and attend with ``q``
        ``[batch, num_q_heads, head_dim]``; returns ``[batch, num_q_heads, head_dim]`` in q's dtype."""
        self._check_open()
        if plan.step != self._step:
            raise ValueError(f"plan is from step {plan.step}; the latest plan is step {self._step}")
        batch, heads = len(plan.request_ids), self.num_kv_heads
        for name, tensor in (("key", key), ("value", value)):
            if tuple(tensor.shape) != (batch, heads, q.shape[2]) or tensor.device != self.device:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} on {tensor.device}, expected "
                                 f"[{batch}, {heads}, {q.shape[2]}] on {self.device}")
        backend = ops.resolve_backend(self.backend, q)
        if layer in plan.prefetch_done:
            torch.cuda.current_stream(self.device).wait_event(plan.prefetch_done.pop(layer))
        tokens = self._tokens_to_write(plan, layer, key, value, backend)
        selection = plan.selections[layer] = self._select(plan, layer, q, backend, scale)
        table, pieces = self._resident(plan, layer, selection, tokens)
        out = self._attend(plan, self.pools[layer], q, selection, table, backend, scale)
        if self.config.prefetch_ahead > 0:
            self._remember(plan, layer, pieces)
        return out

    def _tokens_to_write(self, plan: OffloadPlan, layer: int, key: torch.Tensor, value: torch.Tensor, backend: str
                         ) -> tuple | None:
        """The token write of this layer as :meth:`HotPool.write_tokens` takes it, for the residency launches to
        do; or None when a block opened or filled this step: then the token is written (and a filled block's
        summary made) here, before selection reads the summaries."""
        tokens = (plan.tail_pieces, plan.tail_offsets, key.reshape(-1, key.shape[-1]),
                  value.reshape(-1, value.shape[-1]))
        if plan.tails_resident and not plan.filled_rows.numel():
            return tokens
        self._complete_filled(plan, layer, backend, self._write_token(plan, layer, tokens))
        return None

    def _select(self, plan: OffloadPlan, layer: int, q: torch.Tensor, backend: str, scale: float | None
                ) -> Selection:
        """The blocks ``layer`` attends this step: all of them while the batch is dense or the layer is."""
        if plan.dense or not self.config.sparse_layer(layer):
            return ops.full_selection(plan.seq_lens, self.num_kv_heads, self.block_size, plan.block_table.shape[1])
        if plan.reuse is None:
            return ops.select(backend, q, self.reprs[layer], plan.block_table, plan.seq_lens, self.config,
                              self.block_size, scale=scale, plans=plan.launch_plans)
        return self._reuse.select(layer, plan.step, backend, q, self.reprs[layer], plan.block_table, plan.seq_lens,
                                  self.config, plan.reuse, plan.table_width, scale=scale, plans=plan.launch_plans)

    def _attend(self, plan: OffloadPlan, pool: HotPool, q: torch.Tensor, selection: Selection, table: torch.Tensor,
                backend: str, scale: float | None) -> torch.Tensor:
        """Attention over the pool: each (request, KV head) is one row with its own logical -> slot ``table``."""
        batch, heads, width = selection.sel_idx.shape
        rows = batch * heads
        per_row = Selection(_one_head_rows(selection.sel_idx), selection.sel_count.reshape(rows, 1))
        out = ops.attend(backend, q.reshape(rows, q.shape[1] // heads, q.shape[2]), pool.key_cache, pool.value_cache,
                         table, plan.row_seq_lens, per_row, scale, plan.launch_plans)
        return out.reshape(q.shape)

    # ---- internals -------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self.pools:
            raise RuntimeError("OffloadedGSA: closed (its host KV went back to the Cache tier and its device pools "
                               "were freed); make a new one")

    def _ready(self, request_id: Hashable) -> _Request:
        request = self.requests.get(request_id)
        if request is None or len(request.written) != len(self.pools):
            raise ValueError(f"request {request_id!r}: write_prompt() every layer first")
        return request

    def _pieces(self, blocks: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """``[len(blocks) * num_kv_heads]`` int64 pieces of host ``blocks`` (block-major), on ``device``."""
        host = torch.tensor(blocks, dtype=torch.int64, device=device)
        return (host[:, None] * self.num_kv_heads + torch.arange(self.num_kv_heads, device=device)).flatten()

    def _make_plan(self, request_ids: list, requests: list[_Request], opened: list[int], counts: list[int]
                   ) -> OffloadPlan:
        """The plan of a step whose requests have their blocks and lengths updated (``counts``: blocks each
        selects). The block table on the device is the last plan's while the rows are the same requests with the
        same blocks (a steady batch between block openings): only the per-step lengths and pieces are uploaded."""
        nbs = [len(r.blocks) for r in requests]
        heads, block = self.num_kv_heads, self.block_size
        lens = [r.seq_len for r in requests]
        per_row = [(n, r.blocks[-1] * heads + h, (n - 1) % block) for r, n in zip(requests, lens) for h in range(heads)]
        filled = [row for row, (n, _, _) in enumerate(per_row) if n % block == 0]
        opened_pieces = [b * heads + h for b in opened for h in range(heads)]
        rows = len(per_row)
        small32 = torch.tensor(lens + [n for n, _, _ in per_row] + [len(filled)], dtype=torch.int32)
        small64 = torch.tensor([p for _, p, _ in per_row] + [o for _, _, o in per_row] + opened_pieces + filled,
                               dtype=torch.int64)
        small32, table, small64 = self._upload(requests, nbs, small32, small64)
        ints = small64.split([rows, rows, len(opened_pieces), len(filled)])
        return OffloadPlan(self._step, request_ids, small32[:len(lens)], small32[len(lens):-1], table, counts,
                           dense=all(c == nb for c, nb in zip(counts, nbs)), tail_pieces=ints[0],
                           tail_offsets=ints[1], tails_resident=all(r.tail_resident for r in requests),
                           new_tail_pieces=ints[2], filled_rows=ints[3], filled_count=small32[-1:])

    def _upload(self, requests: list[_Request], nbs: list[int], small32: torch.Tensor, small64: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``small32``, the block table ``[batch, max(nbs)]`` int32 and ``small64`` on the device in one copy; the
        table is the last plan's when its rows are the same requests with the same blocks."""
        rows_key = tuple((r.serial, nb) for r, nb in zip(requests, nbs))
        if self._table is not None and self._table[0] == rows_key:
            small32, small64 = self._staging.upload(small32, small64)
            return small32, self._table[1], small64
        width = max(nbs)
        table = torch.zeros(len(requests), padded_width(width), dtype=torch.int32)  # rows padded: padded_empty
        for row, request in enumerate(requests):
            table[row, :nbs[row]] = request.block_row()
        small32, table, small64 = self._staging.upload(small32, table, small64)
        table = table[:, :width]
        self._table = (rows_key, table)
        return small32, table, small64

    def _check_budget(self, requests: list[_Request], counts: list[int]) -> None:
        """Raise ValueError unless a layer's pool holds this step: the selected and newest blocks' pieces of the
        batch, and the pinned newest blocks of the requests not in it."""
        batch = {id(r) for r in requests}
        waiting = sum(1 for r in self.requests.values() if id(r) not in batch and r.tail_resident)
        needed = self.num_kv_heads * (sum(counts) + len(requests) + waiting)
        if needed > self.capacity:
            raise ValueError(f"{self.budget_key}: this step needs up to {needed} pieces per layer on the device "
                             f"({self.num_kv_heads} KV heads x ({sum(counts)} selected blocks + {len(requests)} "
                             f"newest blocks of the batch + {waiting} of waiting requests)), the budget holds "
                             f"{self.capacity}; raise {self.budget_key.split('=')[0]} (or lower sparse_ratio / the "
                             "batch)")

    def _write_token(self, plan: OffloadPlan, layer: int, tokens: tuple) -> torch.Tensor:
        """Make each request's newest block resident and pinned, write the token (``tokens`` as
        :meth:`HotPool.write_tokens` takes them) into it; return its slots."""
        pool = self.pools[layer]
        if not plan.tails_resident:
            wanted = torch.ones_like(plan.tail_pieces, dtype=torch.bool)
            _, fetch = pool.admit(plan.tail_pieces, wanted, below=self._now, stamp=self._now,
                                  max_new=wanted.numel(), tally=self._counters.tails)
            fetch = fetch._replace(pieces=torch.where(torch.isin(fetch.pieces, plan.new_tail_pieces), -1,
                                                      fetch.pieces))
            pool.fetch(self.host.rows(layer), fetch, SYNC_COPY_PROGRAMS)
            self._counters.opened += plan.new_tail_pieces.numel()
        return pool.write_tokens(*tokens, stamp=self._now)

    def _complete_filled(self, plan: OffloadPlan, layer: int, backend: str, tail_slots: torch.Tensor) -> None:
        """For blocks the new token filled: representations from the pool, copy to the host, unpin."""
        if not plan.filled_rows.numel():
            return
        pool = self.pools[layer]
        slots, pieces = tail_slots[plan.filled_rows], plan.tail_pieces[plan.filled_rows]
        scratch = self._scratch[layer]
        ops.update_reprs(backend, pool.key_cache, slots, scratch)
        for target, source in zip(self.reprs[layer], scratch):
            target.flatten(0, 1)[pieces] = source.flatten(0, 1)[slots]  # a piece is one (block, KV head)
        pool.copy(pool.rows, self.host.rows(layer), slots, pieces, plan.filled_count, SYNC_COPY_PROGRAMS)
        self._counters.written += slots.numel()
        pool.pinned.index_fill_(0, slots, False)

    def _resident(self, plan: OffloadPlan, layer: int, selection: Selection, tokens: tuple | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the selected pieces resident, copying the missing ones in (and write ``tokens``, if given, in the
        same launches); returns the attention table over the pool ``[batch * heads, max_blocks]`` and the selected
        pieces ``[batch, heads, width]`` (-1 unlisted)."""
        pool = self.pools[layer]
        table, pieces, _ = pool.admit_selection(selection.sel_idx, selection.sel_count, plan.block_table,
                                                below=self._now, stamp=self._now, tally=self._counters.listed,
                                                host_rows=self.host.rows(layer), tokens=tokens)
        return table, pieces

    @property
    def _now(self) -> int:
        """The stamp of what the current step reads (predictions of it get one less)."""
        return 2 * self._step

    def _remember(self, plan: OffloadPlan, layer: int, pieces: torch.Tensor) -> None:
        """Keep this step's selected pieces of ``layer`` (``[batch, heads, width]``, -1 unlisted): a request's row
        of them predicts its next steps (no host sync, nothing per request)."""
        self._selected.setdefault(self._step, {})[layer] = pieces

    def _prefetch(self, plan: OffloadPlan, away: list[_Request]) -> None:
        """Admit, layer by layer, the live predictions of requests that did not run last step (at most
        ``max_pending_prefetch`` of them, the most recently run first), and queue their copies (on the prefetch
        stream on a GPU)."""
        if not away:  # every request ran last step: their selections are resident (each run waited its copies)
            return
        away = sorted(away, key=lambda r: -r.last_step)[:self.config.max_pending_prefetch]
        oldest, predicted = self._step - self.config.prefetch_ahead, self._now - 1
        programs = PROGRAMS_PER_PREFETCH_WORKER * self.config.prefetch_workers
        stream = self._prefetch_stream
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)  # last step's copies are in before slots move
        for layer, pool in enumerate(self.pools):
            live = [selected[layer][r.last_row].flatten() for r in away if r.last_step >= oldest
                    and layer in (selected := self._selected.get(r.last_step, {}))]
            if not live:
                continue
            pieces = torch.cat(live)
            _, fetch = pool.admit(pieces, pieces >= 0, below=predicted, stamp=predicted,
                                  max_new=pieces.numel(),
                                  tally=self._counters.prefetch)
            if stream is None:
                pool.fetch(self.host.rows(layer), fetch, programs)
                continue
            stream.wait_stream(torch.cuda.current_stream(self.device))
            fetch.record_stream(stream)
            with torch.cuda.stream(stream):
                pool.fetch(self.host.rows(layer), fetch, programs)
                plan.prefetch_done[layer] = stream.record_event()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Counters:
    """What :class:`OffloadStats` reports: host counts, and device tallies ``[wanted, admitted]`` int64 that the
    residency kernels add to without a host sync."""

    def __init__(self, piece_bytes: int, device: torch.device):
        self.piece_bytes, self.steps, self.tokens = piece_bytes, 0, 0
        self.opened = 0  # newest-block pieces admitted with nothing to copy (a block the token opened)
        self.written = 0  # pieces copied to the host (blocks that filled)
        self.listed, self.tails, self.prefetch = (torch.zeros(2, dtype=torch.int64, device=device) for _ in range(3))

    def snapshot(self) -> OffloadStats:
        (needed, listed_misses), (_, tail_misses), (_, prefetched) = (
            torch.stack([self.listed, self.tails, self.prefetch]).tolist())
        sync_misses = listed_misses + tail_misses - self.opened
        return OffloadStats(self.piece_bytes, self.steps, self.tokens, needed, sync_misses, prefetched,
                            h2d_bytes=(sync_misses + prefetched) * self.piece_bytes,
                            d2h_bytes=self.written * self.piece_bytes)


def _one_head_rows(sel_idx: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, width]`` lists as ``[batch * heads, 1, width]``, a view keeping the row stride (so a padded
    store's stride stays a multiple of 16 in every dimension) where the rows are evenly spaced, else a copy."""
    batch, heads, width = sel_idx.shape
    if evenly_strided_rows(sel_idx):
        row = sel_idx.stride(1)
        return sel_idx.as_strided((batch * heads, 1, width), (row, row, 1))
    return sel_idx.reshape(batch * heads, 1, width)


def _check_one_stage(config: GSAConfig) -> None:
    """Raise ValueError naming the key for settings the offload mode does not run."""
    if config.rerank_candidates > 1:
        raise ValueError(f"rerank_candidates: got {config.rerank_candidates}; the offload mode selects in one "
                         "stage (1) for now")


def _check_reachable(host: HostKV, device: torch.device) -> None:
    """Raise ValueError unless the device's copy kernels can read the host KV in place (pinned memory)."""
    if device.type == "cuda" and host.num_blocks and not host.rows(0).is_pinned():
        raise ValueError("cache: the Cache tier's pool is not pinned; offload on a GPU reads the host KV in place "
                         "over PCIe, which needs pinned memory (PinnedMemoryPool(pinned=True))")


def _budget(config: GSAConfig, num_layers: int, num_kv_heads: int, piece_bytes: int) -> tuple[str, int]:
    """(the budget key as ``key=value``, pieces per layer) from gpu_budget_bytes, else gpu_budget_blocks."""
    if config.gpu_budget_bytes is None:
        return f"gpu_budget_blocks={config.gpu_budget_blocks}", config.gpu_budget_blocks * num_kv_heads
    capacity = config.gpu_budget_bytes // (num_layers * piece_bytes)
    if capacity < 1:
        raise ValueError(f"gpu_budget_bytes: got {config.gpu_budget_bytes}, less than one piece per layer "
                         f"({num_layers} layers x {piece_bytes} bytes)")
    return f"gpu_budget_bytes={config.gpu_budget_bytes}", capacity


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
