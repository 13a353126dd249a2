"""GSA as a Hugging Face transformers attention implementation, for notebooks.

Importing this module registers ``attn_implementation="ucm_gsa"`` in transformers' attention and mask registries:
prefill (more than one query token) runs transformers' SDPA attention; each decode step (one query token) runs GSA
over the model's own KV cache (``DynamicCache`` K/V ``[batch, kv_heads, seq, head_dim]``) viewed as blocks of
``block_size`` tokens, with the ``ucm_sparse`` ops (torch on CPU, Triton kernels for bf16/fp16 CUDA tensors).
Decoder layers whose ``layer_idx`` is below ``dense_first_layers`` decode with SDPA too. With ``select_every``
N > 1 a layer keeps the selection of its last fresh step on the module and attends it for the next N - 1 decode
steps while the batch's block count stays the same (as ``ucm_sparse.reuse`` rules for the other paths; a
prefill, i.e. a new ``generate``, forgets it); with ``select_drift`` also while no row's queries drifted past it
from those the selection was made with (one age per layer here: a drifted row reselects the whole batch; the
check reads its answer on the host once a layer and step). With ``select_every > 1`` each module counts its GSA
decode steps that selected (a sequence too short to go sparse included) and that reused (``module.ucm_gsa_counts``).

    import ucm_sparse.hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ucm_gsa")  # default GSAConfig()
    ucm_sparse.hf.enable(model, GSAConfig(sparse_ratio=0.3), block_size=32)            # or choose the settings

Each decode step recomputes the block summaries of every block (no state across steps), and views the cache as
blocks without a copy only for batch 1 with a whole number of blocks; otherwise K and V are copied into a block
layout (TODO(issue 17): a block-layout cache class to avoid the copy and keep summaries across steps).
Left padding in batched decode is not supported (GSA attends every token up to the sequence length).
"""
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ucm_kernels._utils import check_positive_int
from ucm_kernels.query_drift import torch_query_drift

from . import ops
from .config import GSAConfig, load_gsa_fragment
from .gsa import sparse_attention

ATTN_IMPLEMENTATION = "ucm_gsa"


@dataclass(frozen=True)
class HFGSASettings:
    """GSA settings of one model's attention layers."""

    config: GSAConfig = GSAConfig()  # the GSA selection settings (offload must be off)
    block_size: int = 32  # tokens per KV block the cache is viewed as
    backend: str = "auto"  # "auto", "triton" or "torch" (see ucm_sparse.ops)

    def __post_init__(self) -> None:
        check_positive_int("block_size", self.block_size)
        if self.config.offload:
            raise ValueError("offload: got True, expected False (the transformers hook keeps the KV on the device)")
        ops.check_backend(self.backend)


DEFAULT_SETTINGS = HFGSASettings()


@dataclass(frozen=True)
class KeptSelection:
    """One layer's selection between decode steps (``select_every > 1``): its lists, the tokens per row when it
    was last used, how many steps ago it was made, and the queries it was made with (``[batch, heads,
    head_dim]``)."""

    selection: ops.Selection
    seq: int
    age: int
    queries: torch.Tensor

    def serves(self, q: torch.Tensor, seq: int, settings: HFGSASettings) -> bool:
        """Whether this step (queries ``q [batch, heads, head_dim]`` of rows of ``seq`` tokens) may attend the
        kept lists: the reuse rule, and with ``select_drift`` no row's queries drifted past it."""
        same_blocks = -(-seq // settings.block_size) == -(-self.seq // settings.block_size)
        if not (self.selection.sel_count.shape[0] == q.shape[0] and seq == self.seq + 1 and same_blocks
                and self.age + 1 < settings.config.select_every):
            return False
        if settings.config.select_drift is None:
            return True
        rows = torch.arange(q.shape[0], device=q.device)  # a drifted row's queries are kept: the caller reselects
        fresh = torch_query_drift(q, self.queries, rows, torch.zeros_like(rows, dtype=torch.int32),
                                  threshold=settings.config.select_drift)
        return not bool(fresh.any())


@dataclass
class ReuseCounts:
    """A module's GSA decode steps (``select_every > 1``): how many selected afresh, how many reused."""

    selected: int = 0
    reused: int = 0


def enable(model: torch.nn.Module, config: GSAConfig | Mapping | None = None, *, block_size: int = 32,
           backend: str = "auto") -> torch.nn.Module:
    """Switch ``model`` (a transformers model) to GSA decode attention with these settings; returns ``model``.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through transformers' attention registry.
        config: a GSAConfig, or a mapping of GSA keys (e.g. ``{"sparse_ratio": 0.3}``; unknown keys raise a
            ConfigError naming them); default ``GSAConfig()``.
        block_size: tokens per KV block.
        backend: "auto", "triton" or "torch".
    """
    if config is None:
        config = GSAConfig()
    elif isinstance(config, Mapping):
        config = load_gsa_fragment(config)
    elif not isinstance(config, GSAConfig):
        raise ValueError(f"config: got {type(config).__name__}, expected a GSAConfig or a mapping of GSA keys")
    settings = HFGSASettings(config, block_size, backend)
    for module in model.modules():
        module.ucm_gsa, module.ucm_gsa_kept, module.ucm_gsa_counts = settings, None, ReuseCounts()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def gsa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query ``[batch, heads, q_len, head_dim]``, key/value ``[batch, kv_heads,
    seq, head_dim]`` (the whole cache, current token included); returns ``([batch, q_len, heads, head_dim], None)``.
    """
    settings = getattr(module, "ucm_gsa", DEFAULT_SETTINGS)
    if query.shape[2] != 1 or not settings.config.sparse_layer(getattr(module, "layer_idx", None)):
        if query.shape[2] != 1:
            module.ucm_gsa_kept = None  # a prefill starts new sequences
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if not bool(allowed.all()):
            raise ValueError("attention_mask: masked positions in a decode step (left padding?); the ucm_gsa "
                             "attention attends every cached token")
    batch, _, seq, _ = key.shape
    num_blocks = -(-seq // settings.block_size)
    table = torch.arange(batch * num_blocks, dtype=torch.int32, device=key.device).view(batch, num_blocks)
    q, keys, values = query[:, :, 0], as_blocks(key, settings.block_size), as_blocks(value, settings.block_size)
    kept = getattr(module, "ucm_gsa_kept", None)
    counts = getattr(module, "ucm_gsa_counts", ReuseCounts())
    if kept is not None and kept.serves(q, seq, settings):
        lens = torch.full((batch,), seq, dtype=torch.int32, device=key.device)
        out = ops.attend(ops.resolve_backend(settings.backend, q), q, keys, values, table, lens, kept.selection,
                         scaling)
        module.ucm_gsa_kept = replace(kept, seq=seq, age=kept.age + 1)
        counts.reused += 1
        return out[:, None], None
    out, selection = sparse_attention(q, keys, values, table, [seq] * batch, settings.config, scale=scaling,
                                      backend=settings.backend)
    module.ucm_gsa_kept = None
    if settings.config.select_every > 1:
        module.ucm_gsa_kept = KeptSelection(selection, seq, 0, q.clone())
        counts.selected += 1
    return out[:, None], None


def as_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[batch, kv_heads, seq, head_dim]`` as a paged cache ``[batch * num_blocks, block_size, kv_heads,
    head_dim]`` (request b's logical block n at b * num_blocks + n; the tail of the last block zeroed): a view for
    batch 1 with seq a multiple of block_size, else a copy."""
    batch, heads, seq, head_dim = x.shape
    num_blocks, full = -(-seq // block_size), seq // block_size
    if batch == 1 and full == num_blocks:
        return x[0].unflatten(1, (num_blocks, block_size)).permute(1, 2, 0, 3)
    blocks = x.new_empty(batch, num_blocks, heads, block_size, head_dim)
    by_head = blocks.transpose(1, 2)  # [batch, heads, num_blocks, block_size, head_dim], a view
    by_head[:, :, :full] = x[:, :, :full * block_size].unflatten(2, (full, block_size))
    if full < num_blocks:
        rest = seq - full * block_size
        by_head[:, :, full, :rest] = x[:, :, full * block_size:]
        by_head[:, :, full, rest:] = 0
    return blocks.view(batch * num_blocks, heads, block_size, head_dim).transpose(1, 2)


AttentionInterface.register(ATTN_IMPLEMENTATION, gsa_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
