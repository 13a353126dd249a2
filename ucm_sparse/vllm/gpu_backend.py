"""GSA on GPU vLLM: vLLM's FlashAttention backend, with block-sparse attention for the decode rows.

* :class:`GSAFlashMetadataBuilder` (once per step, shared by a group's layers) plans the step
  (:class:`ucm_sparse.vllm.flash_step.FlashGSA`): which blocks get their summaries refreshed, which rows GSA
  serves. It declares CUDA graphs for uniform decode batches only (vLLM then captures those whole and runs the
  others piecewise, attention eager), and turns cascade attention off (GSA rows never share a prefix pass).
* :class:`GSAFlashAttentionImpl` (per layer): a uniform decode batch runs GSA alone (graph-safe: fixed buffers,
  no host sync); a mixed batch runs vLLM's FlashAttention over every row, then GSA over the decode rows.

Without ``ucm_sparse_method: "GSA"`` in the connector's extra config, or with ``sparse_ratio: 1.0`` and no
token budget (no row could ever go sparse), both classes are exactly vLLM's. A layer GSA does not cover (sliding
window, ALiBi, soft cap, sinks, fp8 KV, non-decoder attention) stays dense. The block summaries
(``ucm_sparse.ops.empty_reprs``) are allocated at the first step, beside vLLM's KV cache: 3 x head_size values
per (block, KV head), 3/32 of the KV cache in the cache dtype at block 16 (``repr_dtype: fp8`` halves that);
leave that much GPU memory free (``gpu_memory_utilization``). With ``select_every > 1`` each layer also keeps
its requests' selections in ``4 x max_num_seqs + 1`` slots of ``num_kv_heads x selection width x 4`` bytes (e.g.
1025 x 8 x 2458 x 4 = 81 MB at max_num_seqs 256, 128K tokens, block 16, sparse_ratio 0.3; 2.6 MB at 8).
"""
import dataclasses
import logging

from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadata,
                                                   FlashAttentionMetadataBuilder)

from ucm_sparse.vllm.flash_step import FlashGSA, FlashGSAPlan, goes_sparse
from ucm_sparse.vllm.settings import GSAStats, gsa_config_of, sparse_layer

logger = logging.getLogger(__name__)
stats = GSAStats()


@dataclasses.dataclass
class GSAFlashMetadata(FlashAttentionMetadata):
    gsa: FlashGSAPlan | None = None
    gsa_step: FlashGSA | None = None


def _sparse_config(vllm_config):
    """The GSA settings when they can make a row sparse, else None."""
    config = gsa_config_of(vllm_config)
    return config if config is not None and goes_sparse(config) else None


class GSAFlashMetadataBuilder(FlashAttentionMetadataBuilder):
    """vLLM's FlashAttention metadata builder, plus the GSA step plan when GSA is configured."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = _sparse_config(vllm_config)
        self.gsa = None
        if config is not None:
            self.gsa = FlashGSA(config, block_size=self.block_size, num_kv_heads=self.num_heads_kv,
                                num_q_heads=self.num_heads_q, head_size=self.headdim,
                                max_rows=vllm_config.scheduler_config.max_num_seqs, dtype=self.kv_cache_dtype,
                                device=device)
            logger.info("UCM GSA on %d attention layers (GPU, FlashAttention): %s", len(layer_names), config)
        self._reprs_ready = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        support = super().get_cudagraph_support(vllm_config, kv_cache_spec)
        if _sparse_config(vllm_config) is None:
            return support
        return min(support, AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, key=lambda s: s.value)

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return self.gsa is None and super().use_cascade_attention(*args, **kwargs)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.gsa is None:
            return metadata
        if not self._reprs_ready:
            self._attach_reprs()
        common = common_attn_metadata
        plan = self.gsa.plan(common.seq_lens, common.query_start_loc, common.query_start_loc_cpu,
                             metadata.block_table[:common.num_reqs], common.max_query_len,
                             getattr(common, "is_prefilling", None))
        if plan.decode is not None:
            stats.steps += 1
            stats.sparse_rows += plan.decode.seq_lens.shape[0]
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        return GSAFlashMetadata(**fields, gsa=plan, gsa_step=self.gsa)

    def _attach_reprs(self) -> None:
        """Give each covered layer of this group its block summaries, sized by its bound KV cache (first build:
        the caches exist by then, and no CUDA graph is being captured while metadata is built). A layer below
        ``dense_first_layers`` gets none: it stays vLLM's FlashAttention."""
        layers = self.vllm_config.compilation_config.static_forward_context
        for name in self.layer_names:
            impl = getattr(layers[name], "impl", None)
            if isinstance(impl, GSAFlashAttentionImpl) and impl.covered and \
                    sparse_layer(self.gsa.config, name):
                impl.gsa_layer = self.gsa.layer_state(layers[name].kv_cache.shape[0])
                stats.summary_dtypes.add(str(impl.gsa_layer.reprs[0].dtype))
        self._reprs_ready = True


class GSAFlashAttentionImpl(FlashAttentionImpl):
    """vLLM's FlashAttention, with GSA for the plan's decode rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.covered = (self.attn_type == AttentionType.DECODER and self.alibi_slopes is None
                        and tuple(self.sliding_window) == (-1, -1) and not self.logits_soft_cap
                        and self.sinks is None and self.kv_cache_dtype == "auto")
        self.gsa_layer = None  # its LayerState, given by the builder at the first step

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        plan = getattr(attn_metadata, "gsa", None)
        if plan is None or self.gsa_layer is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if plan.decode is None or not plan.decode.uniform:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                            output_block_scale)
        attn_metadata.gsa_step.run(plan, query, kv_cache, self.gsa_layer, self.scale, output)
        stats.sparse_layer_calls += 1
        return output


class GSAFlashAttentionBackend(FlashAttentionBackend):
    """vLLM's ``FLASH_ATTN`` backend with the GSA-aware builder and implementation."""

    @staticmethod
    def get_impl_cls():
        return GSAFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return GSAFlashMetadataBuilder
