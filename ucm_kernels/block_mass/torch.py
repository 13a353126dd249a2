"""Vectorised torch twin of the block mass kernel (the CPU path), as the softmax mass GSA's second stage ranks
blocks by (the kernel gives per-head log2-sum-exps; ``ucm_sparse.ops.block_mass`` turns them into this)."""
import torch

from ucm_kernels.sparse_decode.torch import listed_tokens


def block_mass(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               sel_idx: torch.Tensor, sel_count: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """fp32 ``[batch, num_kv_heads, width]``: per listed block (``sel_idx`` ``[batch, num_kv_heads, width]``
    logical blocks, ``sel_count`` ``[batch, num_kv_heads]``), the softmax mass (over the listed blocks' tokens, per
    query head, summed over the KV head's group) its tokens get from ``q`` ``[batch, num_q_heads, head_dim]``; 0
    when unlisted. ``key_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]`` through ``block_table``."""
    batch, num_q_heads, head_dim = q.shape
    heads, width = sel_idx.shape[1:]
    scale = head_dim ** -0.5 if scale is None else scale
    gather, live = listed_tokens(block_table, seq_lens, sel_idx, sel_count, key_cache.shape[1])
    keys = gather(key_cache)  # [batch * heads, width * block_size, head_dim]
    queries = q.float().reshape(batch * heads, num_q_heads // heads, head_dim)
    logits = torch.matmul(queries, keys.transpose(1, 2)) * scale
    probs = torch.softmax(logits.masked_fill(~live, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs.sum(dim=1).view(batch, heads, width, -1).sum(-1)
