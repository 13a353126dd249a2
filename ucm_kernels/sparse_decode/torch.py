"""Vectorised torch twin of the sparse decode kernel: the CPU path (any float dtype, fp32 math).

``listed_tokens`` gathers the tokens of listed blocks one row per (request, KV head); ``sparse_decode`` attends
over them with the kernel's semantics (masked tokens, an empty list gives zeros).
"""
import torch


def listed_tokens(block_table: torch.Tensor, seq_lens: torch.Tensor, sel_idx: torch.Tensor, sel_count: torch.Tensor,
                  block_size: int):
    """The tokens of listed blocks, one row per (request, KV head): ``(gather, live)`` where ``gather(cache)``
    reads ``[batch * heads, width * block_size, head_dim]`` fp32 from a ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` cache (tokens not live as zeros, as the kernel's masked loads) and ``live`` is bool ``[batch *
    heads, 1, width * block_size]``: listed (within ``sel_count``, in ``[0, nb)``) and before ``seq_lens``."""
    batch, heads, width = sel_idx.shape
    nb = (seq_lens.long() + block_size - 1) // block_size
    entry = torch.arange(width, device=sel_idx.device)
    listed = (entry < sel_count[..., None].long()) & (sel_idx >= 0) & (sel_idx < nb[:, None, None])
    logical = torch.where(listed, sel_idx.long(), 0)
    phys = block_table.long().gather(1, logical.view(batch, heads * width)).view(batch, heads, width)
    phys = torch.where(listed, phys, 0)
    head = torch.arange(heads, device=sel_idx.device)[None, :, None]
    position = logical[..., None] * block_size + torch.arange(block_size, device=sel_idx.device)
    live = (listed[..., None] & (position < seq_lens.long()[:, None, None, None])).reshape(batch * heads, 1, -1)
    keep = live.transpose(1, 2)

    def gather(cache: torch.Tensor) -> torch.Tensor:
        tokens = cache[phys, :, head].reshape(batch * heads, width * block_size, cache.shape[3]).float()
        return torch.where(keep, tokens, 0.0)

    return gather, live


def sparse_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, sel_idx: torch.Tensor, sel_count: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """Torch twin of ``ucm_kernels.sparse_decode.sparse_decode`` (any float dtype; fp32 math; q's dtype out).

    q ``[batch, num_q_heads, head_dim]``; caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any
    strides); block_table ``[batch, max_blocks]``; seq_lens ``[batch]``; sel_idx ``[batch, num_kv_heads, width]``
    logical blocks; sel_count ``[batch, num_kv_heads]``.
    """
    batch, num_q_heads, head_dim = q.shape
    heads = key_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    gather, live = listed_tokens(block_table, seq_lens, sel_idx, sel_count, key_cache.shape[1])
    keys, values = gather(key_cache), gather(value_cache)
    queries = q.float().reshape(batch * heads, num_q_heads // heads, head_dim)
    scores = torch.matmul(queries, keys.transpose(1, 2)) * scale
    probs = torch.softmax(scores.masked_fill(~live, float("-inf")), dim=-1)
    probs = torch.where(live.any(dim=-1, keepdim=True), probs, 0.0)  # an empty list attends nothing: zeros
    return torch.matmul(probs, values).reshape(batch, num_q_heads, head_dim).to(q.dtype)
