"""GSA for the decode rows of one step over vLLM's FlashAttention paged KV cache, in tensors only (no vLLM
import): the CPU tests run it in the Triton interpreter, and the GPU backend (:mod:`.gpu_backend`) wraps it.

vLLM's FlashAttention cache of a layer is logically ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
(keys in the first half of the last dim, values in the second), stored block-major with tokens before heads;
:func:`flash_kv_views` gives the ``[num_blocks, block_size, num_kv_heads, head_size]`` views the
``ucm_kernels`` read in place.

:meth:`FlashGSA.plan` runs once per step (vLLM's metadata builder) and writes into buffers allocated once:

* the block ranges whose summaries every layer refreshes: per row, the blocks its new tokens filled; for a row
  still prefilling or computing several tokens, every full block (prefix-cache hits and connector loads are
  written without attention seeing them);
* the decode rows (one query token) GSA serves: every row of a uniform decode batch (the buffers stay where a
  CUDA graph captured them, so replays read the new step's values), or the listed rows of a mixed batch (run
  eagerly, after vLLM's kernel has done the whole batch);
* with ``select_every > 1``, each decode row's slot (:meth:`ucm_sparse.reuse.ReuseBook.tail_slots`: found by
  its last block, whatever row vLLM put the request in) and which rows select afresh; the others attend the
  blocks their layer selected at an earlier step, kept per layer and slot in a
  :class:`ucm_sparse.reuse.SelectionStore` (the kernels read and write a row's lists at its slot: no copy);
  with ``select_drift``, each layer's run first adds the rows whose queries turned (one small launch).

:meth:`FlashGSA.run` (per layer) refreshes the summaries, selects and attends, writing the rows' outputs. Every
decode row goes through GSA's kernels; one too short to go sparse attends all of its blocks.
"""
import dataclasses

import torch

from ucm_kernels.staging import host_to_device
from ucm_kernels.block_repr import update_block_repr_ranges
from ucm_kernels.block_select.triton import SelectPlan, plan_select
from ucm_kernels.sparse_decode.triton import DecodePlan, plan_decode, sparse_decode
from ucm_sparse import ops
from ucm_sparse.config import GSAConfig
from ucm_sparse.reuse import SLOTS_PER_ROW, ReuseBook, SelectionStore


def flash_kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[num_blocks, block_size, num_kv_heads, head_size]`` of one layer's FlashAttention
    cache ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (any strides; no copy)."""
    if kv_cache.dim() != 4 or kv_cache.shape[3] != 2 * head_size:
        raise ValueError(f"kv_cache: got shape {tuple(kv_cache.shape)}, expected [num_blocks, num_kv_heads, "
                         f"block_size, 2 * head_size = {2 * head_size}] (vLLM's FlashAttention layout)")
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def goes_sparse(config: GSAConfig) -> bool:
    """False when no request can ever attend fewer than all of its blocks (``sparse_ratio`` 1 and no token
    budget): vLLM's own kernel then serves every row and GSA adds nothing."""
    return config.sparse_ratio < 1.0 or config.token_budget is not None


@dataclasses.dataclass
class DecodeRows:
    """The decode rows of a step that GSA serves, with their per-batch-size plans and output buffers."""

    tokens: torch.Tensor | None  # [n] query-token index per row; None: tokens 0..n-1 (a uniform decode batch)
    seq_lens: torch.Tensor  # [n] int32
    block_table: torch.Tensor  # [n, max_blocks] int32
    select: SelectPlan
    decode: DecodePlan
    sel_idx: torch.Tensor  # [n, num_kv_heads, width] int32, written per layer (no selection reuse)
    sel_count: torch.Tensor  # [n, num_kv_heads] int32
    reselect: torch.Tensor | None = None  # [n] int32, 1: the row selects afresh; None: every row does
    slots: torch.Tensor | None = None  # [n] int64 reuse slot of each row (selection reuse only)
    candidates: tuple | None = None  # two stages: (first-stage plan, cand_idx [n, heads, wide], cand_count [n, heads])

    @property
    def uniform(self) -> bool:
        """Every row of the batch is a GSA row (vLLM's kernel is not run)."""
        return self.tokens is None


@dataclasses.dataclass
class LayerState:
    """What one layer keeps: its block summaries (``ucm_sparse.ops.empty_reprs``) and, with selection reuse, its
    selections between steps."""

    reprs: tuple
    selections: SelectionStore | None


@dataclasses.dataclass
class FlashGSAPlan:
    """One step's GSA work (see the module docstring); made by :meth:`FlashGSA.plan`."""

    block_table: torch.Tensor  # [num_rows, max_blocks] the batch's table
    first: torch.Tensor  # [num_rows] int32: logical blocks [first, end) of each row get their summaries refreshed
    end: torch.Tensor  # [num_rows] int32
    decode: DecodeRows | None  # None: no decode row this step


class FlashGSA:
    """GSA over the FlashAttention caches of one group of layers (one per vLLM metadata builder).

    Args:
        config: the GSA settings (``offload`` off).
        block_size, num_kv_heads, num_q_heads, head_size: the layers' attention shapes.
        max_rows: most rows a batch holds (vLLM's ``max_num_seqs``).
        dtype, device: the KV cache's.
    """

    def __init__(self, config: GSAConfig, *, block_size: int, num_kv_heads: int, num_q_heads: int, head_size: int,
                 max_rows: int, dtype: torch.dtype, device: torch.device | str):
        self.config, self.block_size, self.head_size = config, block_size, head_size
        self.num_kv_heads, self.num_q_heads, self.max_rows = num_kv_heads, num_q_heads, max_rows
        self.dtype, self.device = dtype, torch.device(device)
        self._first = torch.zeros(max_rows, dtype=torch.int32, device=self.device)
        self._end = torch.zeros(max_rows, dtype=torch.int32, device=self.device)
        self._key_like = torch.empty(1, block_size, num_kv_heads, head_size, dtype=dtype, device=self.device)
        self._select_base: dict[int, tuple[SelectPlan, torch.Tensor, torch.Tensor]] = {}  # by table width
        self._per_rows: dict[tuple, tuple[SelectPlan, DecodePlan] | SelectPlan] = {}  # by (rows, table width[, stage])
        self._select_wide: dict[int, tuple[SelectPlan, torch.Tensor, torch.Tensor]] = {}  # two stages, by width
        self._book = None
        if config.select_every > 1:  # slots handed out in turn, SLOTS_PER_ROW per row
            self._book = ReuseBook(config.select_every, SLOTS_PER_ROW * max_rows, block_size, self.device)
            self._slots = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # fixed: graphs read them
            self._reselect = torch.ones(max_rows, dtype=torch.int32, device=self.device)
            if config.select_drift is not None:  # each layer's mask: the step's rows and those whose queries turned
                self._layer_reselect = torch.ones(max_rows, dtype=torch.int32, device=self.device)

    def layer_state(self, num_blocks: int) -> LayerState:
        """A layer's state for its ``num_blocks`` KV blocks: block summaries (``ucm_sparse.ops.empty_reprs``) and,
        when ``select_every > 1``, a store of ``4 x max_rows + 1`` slots' selections (``selection width x
        num_kv_heads x 4`` bytes each, allocated at the first step) and, with ``select_drift``, of their queries
        (``num_q_heads x head_size`` of the cache's dtype each, allocated here)."""
        reprs = ops.empty_reprs(num_blocks, self.num_kv_heads, self.head_size, self.dtype, self.config, self.device)
        store = None if self._book is None else SelectionStore(self._book.capacity, self.num_kv_heads, self.device)
        if store is not None and self.config.select_drift is not None:  # made here, never inside a graph's capture
            store.queries_of(self.num_q_heads, self.head_size, self.dtype)
        return LayerState(reprs, store)

    def plan(self, seq_lens: torch.Tensor, query_start_loc: torch.Tensor, query_start_loc_cpu: torch.Tensor,
             block_table: torch.Tensor, max_query_len: int, prefilling: torch.Tensor | None = None) -> FlashGSAPlan:
        """Plan one step of ``n = block_table.shape[0]`` rows (device work only; no host read of device data).

        Args:
            seq_lens: ``[>= n]`` int32 tokens per row including this step's, on the device.
            query_start_loc, query_start_loc_cpu: ``[>= n + 1]`` int32 first query token of each row (device, host).
            block_table: ``[n, max_blocks]`` int32 logical -> physical block, on the device.
            max_query_len: the longest row's query tokens this step (1: a uniform decode batch).
            prefilling: optional host bool ``[>= n]``: rows whose prompt is not done (their earlier blocks may
                have come from a prefix hit or a connector even when they compute one token).
        """
        rows = block_table.shape[0]
        if rows > self.max_rows:
            raise ValueError(f"block_table: {rows} rows, but the plan buffers hold max_rows={self.max_rows}")
        lens = seq_lens[:rows]
        query_lens = query_start_loc[1:rows + 1] - query_start_loc[:rows]
        whole = query_lens > 1
        if prefilling is not None and bool(prefilling[:rows].any()):  # host data: rare (a prompt's prefix-hit step)
            whole |= host_to_device(prefilling[:rows], self.device)
        first, end = self._first[:rows], self._end[:rows]
        torch.floor_divide(lens, self.block_size, out=end)
        first.copy_(torch.where(whole, 0, (lens - query_lens) // self.block_size))
        if self._book is not None and max_query_len > 1:
            self._book.forget_tails(lens, block_table, query_lens > 1)
        decode = self._decode_rows(lens, query_start_loc_cpu[:rows + 1], block_table, max_query_len, whole)
        return FlashGSAPlan(block_table, first, end, decode)

    def run(self, plan: FlashGSAPlan, query: torch.Tensor, kv_cache: torch.Tensor, layer: LayerState, scale: float,
            output: torch.Tensor) -> None:
        """One layer's GSA work for ``plan``: refresh the layer's summaries (``layer`` from :meth:`layer_state`),
        select (the rows the plan says) and attend the decode rows, writing their rows of ``output``.

        Args:
            query: ``[num_tokens, num_q_heads, head_size]`` the step's queries.
            kv_cache: the layer's FlashAttention cache (see :func:`flash_kv_views`), this step's keys written.
            output: ``[num_tokens, num_q_heads, head_size]`` written at the decode rows' tokens only.
        """
        key_cache, value_cache = flash_kv_views(kv_cache, self.head_size)
        update_block_repr_ranges(key_cache, plan.block_table, plan.first, plan.end, *layer.reprs)
        rows = plan.decode
        if rows is None:
            return
        n = rows.seq_lens.shape[0]
        q = query[:n] if rows.uniform else query[rows.tokens]
        kmin, kmax, kmean, *kscale = layer.reprs
        selection = (rows.sel_idx, rows.sel_count) if layer.selections is None else \
            layer.selections.buffers(rows.select.width)  # reuse: every slot's lists, each row reads its slot's
        kscale = kscale[0] if kscale else None
        reselect = rows.reselect
        if reselect is not None and self.config.select_drift is not None:  # this layer's rows whose queries turned
            reselect = layer.selections.drifted("triton", q, rows.slots, reselect, self.config.select_drift,
                                                out=self._layer_reselect[:n])
        if rows.candidates is None:
            rows.select.run(q, kmin, kmax, kmean, rows.block_table, rows.seq_lens, kscale=kscale, out=selection,
                            reselect=reselect, sel_rows=rows.slots, scale=scale)
        else:
            self._two_stage(rows, q, key_cache, (kmin, kmax, kmean, kscale), scale, selection, reselect)
        out = sparse_decode(q, key_cache, value_cache, rows.block_table, rows.seq_lens, *selection, scale=scale,
                            out=output[:n] if rows.uniform else None, plan=rows.decode, sel_rows=rows.slots)
        if not rows.uniform:
            output[rows.tokens] = out

    def _two_stage(self, rows: DecodeRows, q: torch.Tensor, key_cache: torch.Tensor, reprs: tuple, scale: float,
                   selection: tuple, reselect: torch.Tensor | None) -> None:
        """``config.rerank_candidates`` > 1: the score rule's wider selection as candidates (rows' own buffers),
        the candidates' attention mass (``ucm_kernels.block_mass``) and the select kernel's top-k over it into
        ``selection`` (at the rows' slots with reuse); rows ``reselect`` (the layer's mask) leaves out do no work."""
        wide, cand_idx, cand_count = rows.candidates
        kmin, kmax, kmean, kscale = reprs
        wide.run(q, kmin, kmax, kmean, rows.block_table, rows.seq_lens, kscale=kscale, out=(cand_idx, cand_count),
                 reselect=reselect, scale=scale)
        candidates = ops.Selection(cand_idx, cand_count)
        mass = ops.block_mass(q, key_cache, rows.block_table, rows.seq_lens, candidates, scale, reselect)
        ops.keep_most_mass("triton", candidates, mass, rows.block_table, rows.seq_lens, self.config, self.block_size,
                           out=selection, reselect=reselect, sel_rows=rows.slots)

    def _decode_rows(self, lens: torch.Tensor, starts_cpu: torch.Tensor, block_table: torch.Tensor,
                     max_query_len: int, whole: torch.Tensor) -> DecodeRows | None:
        if max_query_len == 1:  # uniform decode: every row, the batch's own tensors
            return self._rows_of(None, lens, block_table, whole)
        query_lens = starts_cpu[1:] - starts_cpu[:-1]
        rows = (query_lens == 1).nonzero().flatten()
        if rows.numel() == 0:
            return None
        index = host_to_device(rows, self.device)
        tokens = host_to_device(starts_cpu[rows].long(), self.device)
        return self._rows_of(tokens, lens[index], block_table[index], whole[index])

    def _rows_of(self, tokens: torch.Tensor | None, lens: torch.Tensor, block_table: torch.Tensor,
                 whole: torch.Tensor) -> DecodeRows:
        n, width = block_table.shape
        select, decode = self._plans(n, width)
        _, sel_idx, sel_count = self._select_base[width]
        rows = DecodeRows(tokens, lens, block_table, select, decode, sel_idx[:n], sel_count[:n])
        if self.config.rerank_candidates > 1:
            _, cand_idx, cand_count = self._wide_base(width)
            rows.candidates = (self._per_rows[n, width, "wide"], cand_idx[:n], cand_count[:n])
        if self._book is not None:  # rows whose earlier blocks came from elsewhere (whole) take new slots
            rows.slots = self._slots[:n]
            rows.slots.copy_(self._book.tail_slots(lens, block_table, new_rows=whole))
            rows.reselect = self._reselect[:n]
            rows.reselect.copy_(self._book.step(lens, block_table, rows.slots))
        return rows

    def _plans(self, rows: int, width: int) -> tuple[SelectPlan, DecodePlan]:
        """Selection and attention plans for ``rows`` rows of a ``width``-block table, made once and kept (their
        scratch must outlive any CUDA graph that captured it)."""
        key = (rows, width)
        if key not in self._per_rows:
            base, sel_idx, _ = self._base(width)
            select = base.for_rows(rows)
            q_like = torch.empty(rows, self.num_q_heads, self.head_size, dtype=self.dtype, device=self.device)
            self._per_rows[key] = select, plan_decode(q_like, self._key_like, sel_idx.shape[2])
            if self.config.rerank_candidates > 1:
                wide = self._wide_base(width)[0]
                self._per_rows[rows, width, "wide"] = wide.for_rows(rows)
        return self._per_rows[key]

    def _wide_base(self, width: int) -> tuple[SelectPlan, torch.Tensor, torch.Tensor]:
        """Two stages: the first stage's plan (the score rule at ``rerank_candidates`` times the blocks) and its
        candidate buffers, for ``max_rows`` rows of a ``width``-block table."""
        if width not in self._select_wide:
            self._select_wide[width] = self._plan_with_lists(width, ops.candidate_sizes(self.config, self.block_size))
        return self._select_wide[width]

    def _base(self, width: int) -> tuple[SelectPlan, torch.Tensor, torch.Tensor]:
        """The selection plan and output buffers of ``max_rows`` rows of a ``width``-block table."""
        if width not in self._select_base:
            self._select_base[width] = self._plan_with_lists(width, ops.select_sizes(self.config, self.block_size))
        return self._select_base[width]

    def _plan_with_lists(self, width: int, sizes: dict) -> tuple[SelectPlan, torch.Tensor, torch.Tensor]:
        """A selection plan of ``sizes`` for ``max_rows`` rows of a ``width``-block table, and its list buffers."""
        plan = plan_select(self.max_rows, self.num_kv_heads, self.head_size, width, score=self.config.score,
                           device=self.device, num_q_heads=self.num_q_heads, **sizes)
        sel_idx = torch.full((self.max_rows, self.num_kv_heads, plan.width), -1, dtype=torch.int32, device=self.device)
        sel_count = torch.zeros(self.max_rows, self.num_kv_heads, dtype=torch.int32, device=self.device)
        return plan, sel_idx, sel_count
