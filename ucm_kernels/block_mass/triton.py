"""Triton kernel and launcher of :func:`block_lse2`: one program per (request, KV head, chunk of list entries)."""
import math

import torch
import triton
import triton.language as tl

from .._launch import Launcher, wait_for_previous_grid
from .._utils import INDEX_DTYPES, TL_DTYPES, cdiv, check_tensor, compute_dtype, next_pow2, triton_interpreting

_TILE_TOKENS = 64  # tokens per loop step: several blocks of 16 keep enough key bytes in flight
_ENTRIES_PER_PROGRAM = 32  # list entries (blocks) one program scores


@triton.jit(do_not_specialize=["width", "chunk"])
def _block_lse2_kernel(
    q_ptr,  # [batch, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [batch, max_blocks]
    seq_lens_ptr,  # [batch]
    sel_idx_ptr,  # [batch, num_kv_heads, width] logical blocks, -1 padded
    sel_count_ptr,  # [batch, num_kv_heads]
    reselect_ptr,  # [batch] rows to compute (read if MASKED)
    out_ptr,  # [batch, num_kv_heads, group, width] fp32
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_btb, stride_btj,
    stride_sib, stride_sih, stride_sij,
    stride_scb, stride_sch,
    stride_ob, stride_oh, stride_og, stride_oj,
    num_kv_heads, width, chunk, qk_scale_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_TILE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, MASKED: tl.constexpr, PDL: tl.constexpr = 0,
):
    wait_for_previous_grid(PDL)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // num_kv_heads
    h = pid % num_kv_heads
    if MASKED:
        if tl.load(reselect_ptr + b) == 0:
            return
    start = tl.program_id(1).to(tl.int64) * chunk
    end = tl.minimum(start + chunk, width)  # every entry of the row is written: those past sel_count as -inf
    count = tl.load(sel_count_ptr + b * stride_scb + h * stride_sch).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + (h * GROUP + rows)[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(COMPUTE_DTYPE)
    k_head = k_cache_ptr + h * stride_kh + dims[None, :] * stride_kd
    TILE: tl.constexpr = BLOCKS_PER_TILE * BLOCK_SIZE
    slot = tl.arange(0, TILE) // BLOCK_SIZE
    within = tl.arange(0, TILE) % BLOCK_SIZE
    out_row = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_og
    for first in range(start, end, BLOCKS_PER_TILE):
        entry = first + slot
        listed = (entry < end) & (entry < count)
        logical = tl.load(sel_idx_ptr + b * stride_sib + h * stride_sih + entry * stride_sij, mask=listed, other=-1)
        token_ok = listed & (logical >= 0) & (logical * BLOCK_SIZE + within < seq_len)
        physical = tl.load(block_table_ptr + b * stride_btb + logical * stride_btj, mask=token_ok, other=0)
        rows_at = physical.to(tl.int64) * stride_kb + within * stride_kt
        k = tl.load(k_head + rows_at[:, None], mask=token_ok[:, None], other=0.0).to(COMPUTE_DTYPE)
        logits = tl.where(token_ok[None, :], tl.dot(q, tl.trans(k)) * qk_scale_log2, float("-inf"))
        by_block = tl.reshape(logits, (GROUP_PAD, BLOCKS_PER_TILE, BLOCK_SIZE))
        peak = tl.max(by_block, axis=2)
        shift = tl.where(peak == float("-inf"), 0.0, peak)
        total = tl.sum(tl.exp2(by_block - shift[:, :, None]), axis=2)
        lse2 = tl.where(total > 0, shift + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))
        entries = first + tl.arange(0, BLOCKS_PER_TILE)
        tl.store(out_row + entries[None, :] * stride_oj, lse2, mask=row_ok[:, None] & (entries < end)[None, :])


_LSE2 = Launcher(_block_lse2_kernel)


def _check_inputs(q, key_cache, block_table, seq_lens, sel_idx, sel_count) -> None:
    check_tensor("q", q, 3, tuple(TL_DTYPES), q.device if isinstance(q, torch.Tensor) else None,
           "[batch, num_q_heads, head_dim]")
    if not q.is_cuda and not triton_interpreting():
        raise ValueError(f"q is on {q.device}: the kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    batch, num_q_heads, head_dim = q.shape
    check_tensor("key_cache", key_cache, 4, (q.dtype,), q.device, "[num_blocks, block_size, num_kv_heads, head_dim]")
    block_size, heads = key_cache.shape[1], key_cache.shape[2]
    if key_cache.shape[3] != head_dim or num_q_heads % heads:
        raise ValueError(f"key_cache: got {tuple(key_cache.shape)}, expected head_dim {head_dim} and num_kv_heads "
                         f"dividing q's {num_q_heads} query heads")
    if head_dim < 16 or head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"key_cache: head_dim {head_dim} and block_size {block_size} must be powers of two "
                         "(head_dim >= 16)")
    check_tensor("block_table", block_table, 2, INDEX_DTYPES, q.device, f"[batch={batch}, max_blocks]")
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, q.device, f"[batch={batch}]")
    check_tensor("sel_idx", sel_idx, 3, (torch.int32,), q.device, f"[batch={batch}, num_kv_heads={heads}, width]")
    check_tensor("sel_count", sel_count, 2, (torch.int32,), q.device, f"[batch={batch}, num_kv_heads={heads}]")
    if (block_table.shape[0] != batch or seq_lens.shape[0] != batch or tuple(sel_idx.shape[:2]) != (batch, heads)
            or tuple(sel_count.shape) != (batch, heads)):
        raise ValueError(f"block_table {tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)}, sel_idx "
                         f"{tuple(sel_idx.shape)}, sel_count {tuple(sel_count.shape)}: expected {batch} requests "
                         f"and {heads} KV heads")


def block_lse2(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               sel_idx: torch.Tensor, sel_count: torch.Tensor, scale: float | None = None,
               reselect: torch.Tensor | None = None) -> torch.Tensor:
    """Per listed block and query head, the log2 of the summed exponentials of its tokens' attention logits.

    Args:
        q: ``[batch, num_q_heads, head_dim]`` bf16/fp16; query head i belongs to KV head ``i // group``.
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype, any strides; head_dim and
            block_size powers of two (head_dim >= 16).
        block_table: ``[batch, max_blocks]`` int32/int64 logical -> physical block.
        seq_lens: ``[batch]`` int32/int64 tokens per request; a block's tokens at or past it do not count.
        sel_idx: ``[batch, num_kv_heads, width]`` int32 logical blocks (-1: none); sel_count ``[batch,
            num_kv_heads]`` int32: how many leading entries are listed.
        scale: softmax scale of the logits (default ``head_dim ** -0.5``).
        reselect: optional ``[batch]`` int32/bool: only the rows where it is nonzero are computed; the others'
            rows of the result are left unwritten (``select_every``: rows that keep their lists).
    Returns:
        fp32 ``[batch, num_kv_heads, group, width]``: ``log2 sum_t 2 ** (scale * log2(e) * q_g . k_t)`` over the
        entry's live tokens; -inf for entries not listed, -1, or with no token before seq_len.
    """
    _check_inputs(q, key_cache, block_table, seq_lens, sel_idx, sel_count)
    batch, num_q_heads, head_dim = q.shape
    if reselect is not None:
        check_tensor("reselect", reselect, 1, (torch.int32, torch.bool), q.device, f"[batch={batch}]")
        if reselect.shape[0] != batch:
            raise ValueError(f"reselect: got shape {tuple(reselect.shape)}, expected [{batch}]")
    block_size, heads = key_cache.shape[1], key_cache.shape[2]
    group, width = num_q_heads // heads, sel_idx.shape[2]
    out = torch.empty(batch, heads, group, width, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    blocks_per_tile = max(1, _TILE_TOKENS // block_size)
    chunk = blocks_per_tile * -(-_ENTRIES_PER_PROGRAM // blocks_per_tile)
    scale = head_dim ** -0.5 if scale is None else scale
    _LSE2((batch * heads, cdiv(width, chunk)),
        q, key_cache, block_table, seq_lens, sel_idx, sel_count, seq_lens if reselect is None else reselect, out,
        *q.stride(), *key_cache.stride(), *block_table.stride(), *sel_idx.stride(), *sel_count.stride(),
        *out.stride(), heads, width, chunk, scale * math.log2(math.e),
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCKS_PER_TILE=blocks_per_tile, MASKED=reselect is not None, num_warps=4,
        COMPUTE_DTYPE=compute_dtype(q.dtype),
    )
    return out
