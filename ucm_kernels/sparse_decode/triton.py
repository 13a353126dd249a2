"""Split-K paged decode attention over per-(request, KV head) block lists (flash-decoding), kernels + launchers.

``_sparse_decode_split_kernel`` runs one program per (request, KV head, split): it walks its share of the block
list, gathers ``TILE_TOKENS`` tokens of K and V per step through the block table (several 16-token blocks per
step keep enough bytes in flight), scores all query heads of the GQA group at once (the group padded to 16 rows
so ``tl.dot`` is legal on the GPU) and keeps an fp32 online softmax whose partial (max, sum, acc) it writes to
scratch. ``_combine_splits_kernel`` merges the splits of each (request, query head) into the output.
With ``DENSE`` the list is implicit (every logical block), which is our dense decode kernel.
"""
import torch
import triton
import triton.language as tl

from .._utils import autotune_configs, check_device, triton_interpreting

# Triton 3.6 pipelines the gathered K/V loads with cp.async, but stages also go to the index loads ahead of
# them: compiled for sm_90 (head_dim 128, bf16), 3 stages give one K/V buffer (74 KB of shared memory at 128
# tokens, 39 KB at 64), 5 stages two (140 KB / 72 KB; one for the sparse variant at 64 tokens).
_TILE_CONFIGS = [
    triton.Config({"TILE_TOKENS": 64}, num_warps=4, num_stages=3),
    triton.Config({"TILE_TOKENS": 128}, num_warps=4, num_stages=3),
    triton.Config({"TILE_TOKENS": 128}, num_warps=8, num_stages=3),
    triton.Config({"TILE_TOKENS": 64}, num_warps=4, num_stages=5),
    triton.Config({"TILE_TOKENS": 128}, num_warps=4, num_stages=5),
]
_MAX_TILE_TOKENS = 128
_MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (q load, partial write, combine) starts to show
_MAX_SPLITS = 64  # bounds the combine kernel's registers ([splits, head_dim] fp32)
_PROGRAMS_PER_SM = 8  # several waves, so the last one's tail is a small share of the time
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.autotune(configs=autotune_configs(_TILE_CONFIGS), key=["HEAD_DIM", "BLOCK_SIZE", "GROUP_PAD", "DENSE"])
@triton.jit(do_not_specialize=["num_splits", "chunk_blocks"])
def _sparse_decode_split_kernel(
    q_ptr,  # [batch, num_q_heads, head_dim] bf16/fp16
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [batch, max_blocks_per_seq] int32
    seq_lens_ptr,  # [batch] int32
    sel_idx_ptr,  # [batch, num_kv_heads, max_sel] int32 logical blocks (None when DENSE)
    sel_count_ptr,  # [batch, num_kv_heads] int32 (None when DENSE)
    acc_ptr,  # [batch, num_q_heads, num_splits, head_dim] fp32 scratch, contiguous
    stats_ptr,  # [batch, num_q_heads, num_splits, 2] fp32 scratch (running max in log2 units, sum), contiguous
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btj,
    stride_sib, stride_sih, stride_sij,
    stride_scb, stride_sch,
    num_kv_heads, num_splits, chunk_blocks, qk_scale_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DENSE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, TILE_TOKENS: tl.constexpr,
):
    pid_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = pid_head // num_kv_heads
    h = pid_head % num_kv_heads
    BLOCKS_PER_TILE: tl.constexpr = (TILE_TOKENS + BLOCK_SIZE - 1) // BLOCK_SIZE
    TILE: tl.constexpr = BLOCKS_PER_TILE * BLOCK_SIZE

    seq_len = tl.load(seq_lens_ptr + b)
    if DENSE:
        count = tl.cdiv(seq_len, BLOCK_SIZE).to(tl.int64)
    else:
        count = tl.load(sel_count_ptr + b * stride_scb + h * stride_sch).to(tl.int64)
    start = split * chunk_blocks
    end = tl.minimum(start + chunk_blocks, count)

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    q_heads = h * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + q_heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(COMPUTE_DTYPE)
    k_head = k_cache_ptr + h * stride_kh + dims[None, :] * stride_kd
    v_head = v_cache_ptr + h * stride_vh + dims[None, :] * stride_vd
    slot = tl.arange(0, TILE) // BLOCK_SIZE
    within = tl.arange(0, TILE) % BLOCK_SIZE

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for first in range(start, end, BLOCKS_PER_TILE):
        entry = first + slot
        entry_ok = entry < end
        if DENSE:
            logical = entry
        else:
            logical = tl.load(sel_idx_ptr + b * stride_sib + h * stride_sih + entry * stride_sij,
                              mask=entry_ok, other=-1)
        token_ok = entry_ok & (logical >= 0) & (logical * BLOCK_SIZE + within < seq_len)
        physical = tl.load(block_table_ptr + b * stride_btb + logical * stride_btj, mask=token_ok, other=0)
        k_rows = physical.to(tl.int64) * stride_kb + within * stride_kt
        v_rows = physical.to(tl.int64) * stride_vb + within * stride_vt
        k = tl.load(k_head + k_rows[:, None], mask=token_ok[:, None], other=0.0).to(COMPUTE_DTYPE)
        scores = tl.dot(q, tl.trans(k)) * qk_scale_log2
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_rows[:, None], mask=token_ok[:, None], other=0.0).to(COMPUTE_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE_DTYPE), v)
        m_i = m_new

    partial = (b * num_kv_heads * GROUP + q_heads) * num_splits + split
    tl.store(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(stats_ptr + partial * 2, m_i, mask=row_ok)
    tl.store(stats_ptr + partial * 2 + 1, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    acc_ptr,  # [batch, num_q_heads, num_splits, head_dim] fp32, contiguous
    stats_ptr,  # [batch, num_q_heads, num_splits, 2] fp32 (max in log2 units, sum), contiguous
    out_ptr,  # [batch, num_q_heads, head_dim] bf16/fp16
    stride_ob, stride_oh, stride_od,
    num_q_heads, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // num_q_heads
    qh = row % num_q_heads
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    dims = tl.arange(0, HEAD_DIM)
    partial = row * num_splits + splits
    m = tl.load(stats_ptr + partial * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(stats_ptr + partial * 2 + 1, mask=split_ok, other=0.0)
    acc = tl.load(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(weight * l, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + qh * stride_oh + dims * stride_od, out.to(out_ptr.dtype.element_ty))


def sparse_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, sel_idx: torch.Tensor, sel_count: torch.Tensor, *,
                  scale: float | None = None, out: torch.Tensor | None = None,
                  num_splits: int | None = None) -> torch.Tensor:
    """Decode attention of each (request, KV head) over the logical blocks of its list, read in place.

    Args:
        q: ``[batch, num_q_heads, head_dim]`` bf16 or fp16; head_dim a power of two in [16, 256];
            num_q_heads a multiple of num_kv_heads (query head ``i`` uses KV head ``i // group``).
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]``, q's dtype, any strides
            (e.g. ``kv[0]``, ``kv[1]`` of one tensor); block_size a power of two.
        block_table: ``[batch, max_blocks_per_seq]`` int32, logical -> physical block.
        seq_lens: ``[batch]`` int32 tokens per request; tokens at or past it are masked.
        sel_idx: ``[batch, num_kv_heads, max_sel]`` int32 logical block indices (order free; entries outside
            ``[0, ceil(seq_len / block_size))`` are ignored).
        sel_count: ``[batch, num_kv_heads]`` int32, how many leading entries of each list count (0 gives zeros).
        scale: softmax scale, default ``head_dim ** -0.5``.
        out: optional ``[batch, num_q_heads, head_dim]`` of q's dtype, any strides, written in place.
        num_splits: most programs per (request, KV head) (rounded down so none is left without blocks);
            default chosen from the work and the SM count.
    Returns:
        ``out``, ``[batch, num_q_heads, head_dim]`` in q's dtype.
    """
    _check_attention_inputs(q, key_cache, value_cache, block_table, seq_lens)
    _check_selection(q, key_cache, sel_idx, sel_count)
    return _launch(q, key_cache, value_cache, block_table, seq_lens, sel_idx, sel_count,
                   max_blocks=sel_idx.shape[2], scale=scale, out=out, num_splits=num_splits)


def dense_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, *, scale: float | None = None, out: torch.Tensor | None = None,
                 num_splits: int | None = None) -> torch.Tensor:
    """Decode attention over every block of each request: :func:`sparse_decode` with implicit full lists.

    Same arguments and result as :func:`sparse_decode` without the lists. The work per request is bounded by
    ``block_table.shape[1]`` (no host sync on seq_lens), so a table much wider than the longest request spends
    programs that find no blocks.
    """
    _check_attention_inputs(q, key_cache, value_cache, block_table, seq_lens)
    return _launch(q, key_cache, value_cache, block_table, seq_lens, None, None,
                   max_blocks=block_table.shape[1], scale=scale, out=out, num_splits=num_splits)


def _launch(q, key_cache, value_cache, block_table, seq_lens, sel_idx, sel_count, *, max_blocks, scale, out,
            num_splits):
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    out = _check_or_alloc_out(q, out)
    if num_splits is None:
        num_splits = _choose_num_splits(batch * num_kv_heads, max_blocks, block_size, q.device)
    elif num_splits < 1:
        raise ValueError(f"num_splits={num_splits}; expected a positive int or None")
    chunk_blocks = _chunk_blocks(max_blocks, num_splits, block_size)
    num_splits = max(1, triton.cdiv(max_blocks, chunk_blocks))
    acc = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(batch, num_q_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    scale = head_dim ** -0.5 if scale is None else scale
    _launch_split_kernel(q, key_cache, value_cache, block_table, seq_lens, sel_idx, sel_count, acc, stats,
                         chunk_blocks, scale)
    _combine_splits_kernel[(batch * num_q_heads,)](
        acc_ptr=acc, stats_ptr=stats, out_ptr=out,
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(2),
        num_q_heads=num_q_heads, num_splits=num_splits,
        HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits),
    )
    return out


def _launch_split_kernel(q, key_cache, value_cache, block_table, seq_lens, sel_idx, sel_count, acc, stats,
                         chunk_blocks, scale) -> None:
    """Fill the per-split partials; no lists (``sel_idx is None``) selects the DENSE variant."""
    batch, num_q_heads, num_splits, head_dim = acc.shape
    num_kv_heads = key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    dense = sel_idx is None
    sel_strides = (0, 0, 0) if dense else sel_idx.stride()
    count_strides = (0, 0) if dense else sel_count.stride()
    _sparse_decode_split_kernel[(batch * num_kv_heads, num_splits)](
        q_ptr=q, k_cache_ptr=key_cache, v_cache_ptr=value_cache, block_table_ptr=block_table,
        seq_lens_ptr=seq_lens, sel_idx_ptr=sel_idx, sel_count_ptr=sel_count, acc_ptr=acc, stats_ptr=stats,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qd=q.stride(2),
        stride_kb=key_cache.stride(0), stride_kt=key_cache.stride(1), stride_kh=key_cache.stride(2),
        stride_kd=key_cache.stride(3),
        stride_vb=value_cache.stride(0), stride_vt=value_cache.stride(1), stride_vh=value_cache.stride(2),
        stride_vd=value_cache.stride(3),
        stride_btb=block_table.stride(0), stride_btj=block_table.stride(1),
        stride_sib=sel_strides[0], stride_sih=sel_strides[1], stride_sij=sel_strides[2],
        stride_scb=count_strides[0], stride_sch=count_strides[1],
        num_kv_heads=num_kv_heads, num_splits=num_splits, chunk_blocks=chunk_blocks,
        qk_scale_log2=scale * 1.4426950408889634,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=key_cache.shape[1], DENSE=dense,
        COMPUTE_DTYPE=tl.float32 if triton_interpreting() else _TL_DTYPES[q.dtype],
    )


def _choose_num_splits(num_heads: int, max_blocks: int, block_size: int, device: torch.device) -> int:
    """Splits per (request, KV head): enough programs for ``_PROGRAMS_PER_SM`` per SM, none shorter than
    ``_MIN_TOKENS_PER_SPLIT`` tokens, at most ``_MAX_SPLITS``. The interpreter counts as one SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sms, num_heads)
    useful = triton.cdiv(max_blocks * block_size, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def _chunk_blocks(max_blocks: int, num_splits: int, block_size: int) -> int:
    """List entries per split, a multiple of the largest tile (in blocks) so no split ends in a partial tile;
    the launcher then drops the splits this rounding leaves empty."""
    align = triton.cdiv(_MAX_TILE_TOKENS, block_size)
    return max(align, triton.cdiv(triton.cdiv(max_blocks, num_splits), align) * align)


def _check_attention_inputs(q, key_cache, value_cache, block_table, seq_lens) -> None:
    if q.dtype not in _TL_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; expected torch.bfloat16 or torch.float16")
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [batch, num_q_heads, head_dim]")
    batch, num_q_heads, head_dim = q.shape
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"q has head_dim {head_dim}; expected a power of two in [16, 256]")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_device(name, cache, q.device)
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {cache.dtype}; expected q's dtype {q.dtype}")
        if cache.dim() != 4 or cache.shape[3] != head_dim:
            raise ValueError(f"{name} has shape {tuple(cache.shape)}; expected "
                             f"[num_blocks, block_size, num_kv_heads, {head_dim}]")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache has shape {tuple(value_cache.shape)}; expected key_cache's "
                         f"{tuple(key_cache.shape)}")
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if block_size & (block_size - 1):
        raise ValueError(f"key_cache has block_size {block_size}; expected a power of two")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q has {num_q_heads} heads; expected a multiple of num_kv_heads={num_kv_heads}")
    _check_int32("block_table", block_table, q.device, (batch, block_table.shape[-1]), "[batch, max_blocks_per_seq]")
    _check_int32("seq_lens", seq_lens, q.device, (batch,), "[batch]")


def _check_selection(q, key_cache, sel_idx, sel_count) -> None:
    batch, num_kv_heads = q.shape[0], key_cache.shape[2]
    _check_int32("sel_idx", sel_idx, q.device, (batch, num_kv_heads, sel_idx.shape[-1]),
                 "[batch, num_kv_heads, max_sel]")
    _check_int32("sel_count", sel_count, q.device, (batch, num_kv_heads), "[batch, num_kv_heads]")


def _check_int32(name: str, tensor: torch.Tensor, device: torch.device, shape: tuple, expected: str) -> None:
    check_device(name, tensor, device)
    if tensor.dtype != torch.int32:
        raise ValueError(f"{name} has dtype {tensor.dtype}; expected torch.int32")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {expected} = {shape}")


def _check_or_alloc_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    check_device("out", out, q.device)
    if out.dtype != q.dtype or out.shape != q.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} and dtype {out.dtype}; expected {tuple(q.shape)} "
                         f"and {q.dtype} like q")
    return out
