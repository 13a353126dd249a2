"""Split-K paged decode attention over per-(request, KV head) block lists (flash-decoding), kernels + launchers.

``_sparse_decode_split_kernel`` runs one program per (request, KV head, split): it walks its share of the block
list (each list cut by its own length: a short request in a wide table, as vLLM's are, still spreads over the
planned splits), gathers ``TILE_TOKENS`` tokens of K and V per step through the block table (several 16-token blocks per
step keep enough bytes in flight), scores all query heads of the GQA group at once (the group padded to 16 rows
so ``tl.dot`` is legal on the GPU) and keeps an fp32 online softmax. With one split it writes the output
itself; with several it writes partial (max, sum, acc) to scratch, and a second launch,
``_combine_splits_kernel``, merges them, one program per (request, query head). (Merging in the split launch, by
the last split to arrive, was tried and removed: BENCHMARKS.md, "Where a layer's select + attend goes".) With
``DENSE`` the list is implicit (every logical block), which is our dense decode kernel.

Inputs ready ahead (``inputs_ready=True``: lists kept from an earlier step, tables and lengths set before the step):
with PDL (sm_90+) the split kernel's programs may start while the kernel ahead of them finishes; they then read
their list span and first tile's block ids and ask L2 for that tile's K/V rows before waiting for it, and the
combine lets the next launch in as soon as its own programs run (it has a program a query head: the SMs are
mostly free for the next layer's split programs to start on their first tile).

Launch settings and scratch depend on shapes only: :func:`plan_decode` makes them once (a :class:`DecodePlan`)
and every layer's call reuses them, so a call costs its validation and one or two launches, and captures into
a CUDA graph (no host sync, no allocation when ``out`` is given).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._launch import Launcher, let_next_grid_start, wait_for_previous_grid
from .._utils import TL_DTYPES, cdiv, check_device, compute_dtype, next_pow2, sm_count

_MAX_TILE_TOKENS = 128
_MAX_TILE = tl.constexpr(_MAX_TILE_TOKENS)  # the kernels' copy: a split's length is a multiple of it (in blocks)
_MIN_TOKENS_PER_SPLIT = 128  # one tile-aligned chunk; short lists on a small batch still fill the GPU
_MAX_SPLITS = 64  # bounds the split scratch ([batch, num_q_heads, splits, head_dim] fp32) and the combine's loop
# splits the combine merges a loop step ([64, head_dim] fp32 a program): every planned count in one step; four steps
# of 16 took 5.7 us against 2.5 at 62 splits (1 x 128K, ratio 0.3, H200: attend_ab-...-ce147ee)
_SPLITS_TILE = _MAX_SPLITS
_PROGRAMS_PER_SM = 8  # lists: several waves, so the last one's tail is a small share of the time
_DENSE_PROGRAMS_PER_SM = 4  # dense: whole waves of these (see _choose_num_splits)


@triton.jit(do_not_specialize=["num_splits", "chunk_blocks"])
def _sparse_decode_split_kernel(
    q_ptr,  # [batch, num_q_heads, head_dim] bf16/fp16
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [batch, max_blocks_per_seq] int32
    seq_lens_ptr,  # [batch] int32
    sel_idx_ptr,  # [batch, num_kv_heads, max_sel] int32 logical blocks (None when DENSE)
    sel_count_ptr,  # [batch, num_kv_heads] int32 (None when DENSE)
    sel_rows_ptr,  # [batch] int64: the row of sel_idx / sel_count each request reads (read if SEL_ROWS)
    out_ptr,  # [batch, num_q_heads, head_dim] q's dtype (written when DIRECT)
    acc_ptr,  # [batch, num_q_heads, num_splits, head_dim] fp32 scratch, contiguous (None when DIRECT)
    stats_ptr,  # [batch, num_q_heads, num_splits, 2] fp32 scratch (max in log2 units, sum), contiguous
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btj,
    stride_sib, stride_sih, stride_sij,
    stride_scb, stride_sch,
    stride_ob, stride_oh, stride_od,
    num_kv_heads, num_splits, chunk_blocks, qk_scale_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DENSE: tl.constexpr, DIRECT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, TILE_TOKENS: tl.constexpr,
    SEL_ROWS: tl.constexpr, READY: tl.constexpr, PDL: tl.constexpr = 0,
):
    pid_head = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = pid_head // num_kv_heads
    h = pid_head % num_kv_heads
    BLOCKS_PER_TILE: tl.constexpr = (TILE_TOKENS + BLOCK_SIZE - 1) // BLOCK_SIZE
    TILE: tl.constexpr = BLOCKS_PER_TILE * BLOCK_SIZE
    slot = tl.arange(0, TILE) // BLOCK_SIZE
    within = tl.arange(0, TILE) % BLOCK_SIZE
    table_row = block_table_ptr + b * stride_btb
    EARLY: tl.constexpr = READY and PDL >= 1  # the inputs predate the kernel ahead: start on them (module doc)
    ALIGN: tl.constexpr = (_MAX_TILE + BLOCK_SIZE - 1) // BLOCK_SIZE  # blocks of the largest tile
    if not EARLY:
        wait_for_previous_grid(PDL)
    sel_row, seq_len, start, end = _list_span(b, h, split, num_splits, chunk_blocks, seq_lens_ptr, sel_idx_ptr,
                                              sel_count_ptr, sel_rows_ptr, stride_sib, stride_sih, stride_scb,
                                              stride_sch, DENSE, SEL_ROWS, BLOCK_SIZE, ALIGN)
    if EARLY:  # the first tile's K/V rows asked of L2 while the kernel ahead finishes (the loop reads them again)
        token_ok, physical = _tile_indices(start, end, slot, within, seq_len, sel_row, table_row, stride_sij,
                                           stride_btj, DENSE, BLOCK_SIZE)
        _prefetch_rows(k_cache_ptr + h * stride_kh, physical, within, token_ok, stride_kb, stride_kt, stride_kd,
                       HEAD_DIM, k_cache_ptr.dtype.element_ty.primitive_bitwidth)
        _prefetch_rows(v_cache_ptr + h * stride_vh, physical, within, token_ok, stride_vb, stride_vt, stride_vd,
                       HEAD_DIM, v_cache_ptr.dtype.element_ty.primitive_bitwidth)
        wait_for_previous_grid(PDL)

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    q_heads = h * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + q_heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(COMPUTE_DTYPE)
    k_head = k_cache_ptr + h * stride_kh + dims[None, :] * stride_kd
    v_head = v_cache_ptr + h * stride_vh + dims[None, :] * stride_vd

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for first in range(start, end, BLOCKS_PER_TILE):
        token_ok, physical = _tile_indices(first, end, slot, within, seq_len, sel_row, table_row, stride_sij,
                                           stride_btj, DENSE, BLOCK_SIZE)
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

    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty list gives zeros
        tl.store(out_ptr + b * stride_ob + q_heads[:, None] * stride_oh + dims[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        partial = (b * num_kv_heads * GROUP + q_heads) * num_splits + split
        tl.store(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(stats_ptr + partial * 2, m_i, mask=row_ok)
        tl.store(stats_ptr + partial * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _list_span(b, h, split, num_splits, chunk_blocks, seq_lens_ptr, sel_idx_ptr, sel_count_ptr, sel_rows_ptr,
               stride_sib, stride_sih, stride_scb, stride_sch, DENSE: tl.constexpr, SEL_ROWS: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, ALIGN: tl.constexpr):
    """(sel_row, seq_len, start, end) of program (b, h, split): the list row it reads (unused when DENSE), the
    request's length and the list entries [start, end) of its split. Each list is cut into ``num_splits`` shares
    rounded up to ``ALIGN`` blocks, never longer than ``chunk_blocks`` (the plan's, for its widest list), so a short
    request in a wide table still spreads over the splits."""
    seq_len = tl.load(seq_lens_ptr + b)
    sel_row = seq_lens_ptr  # any pointer when DENSE (sel_idx_ptr is None then, which a tuple cannot hold)
    if DENSE:
        count = tl.cdiv(seq_len, BLOCK_SIZE).to(tl.int64)
    else:
        sel_b = b
        if SEL_ROWS:
            sel_b = tl.load(sel_rows_ptr + b).to(tl.int64)
        sel_row = sel_idx_ptr + sel_b * stride_sib + h * stride_sih
        count = tl.load(sel_count_ptr + sel_b * stride_scb + h * stride_sch).to(tl.int64)
    chunk = tl.minimum(chunk_blocks, tl.maximum(ALIGN, tl.cdiv(tl.cdiv(count, num_splits), ALIGN) * ALIGN))
    start = split * chunk
    return sel_row, seq_len, start, tl.minimum(start + chunk, count)


@triton.jit
def _prefetch_rows(head_ptr, physical, within, token_ok, stride_b, stride_t, stride_d, HEAD_DIM: tl.constexpr,
                   BITS: tl.constexpr):
    """Asks L2 for the ``HEAD_DIM``-element rows of one KV head at (physical block, slot within it) of each
    ``token_ok`` token ([TILE] each), a 128-byte line at a time (``prefetch.global.L2``: no registers, no fault)."""
    LINE: tl.constexpr = 1024 // BITS  # elements a 128-byte line
    LINES: tl.constexpr = (HEAD_DIM + LINE - 1) // LINE
    rows = head_ptr + physical.to(tl.int64) * stride_b + within * stride_t
    lines = tl.where(token_ok[:, None], rows[:, None] + (tl.arange(0, LINES) * LINE * stride_d)[None, :], head_ptr)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _tile_indices(first, end, slot, within, seq_len, sel_row, table_row, stride_sij, stride_btj,
                  DENSE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The tile of list entries from ``first``: (token_ok, physical block) per token, ``[TILE]`` each. A token
    counts when its entry lies before ``end``, names a block (>= 0) and lies before ``seq_len``."""
    entry = first + slot
    entry_ok = entry < end
    if DENSE:
        logical = entry
    else:
        logical = tl.load(sel_row + entry * stride_sij, mask=entry_ok, other=-1)
    token_ok = entry_ok & (logical >= 0) & (logical * BLOCK_SIZE + within < seq_len)
    return token_ok, tl.load(table_row + logical * stride_btj, mask=token_ok, other=0)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    acc_ptr,  # [batch, num_q_heads, num_splits, head_dim] fp32, contiguous
    stats_ptr,  # [batch, num_q_heads, num_splits, 2] fp32 (max in log2 units, sum), contiguous
    out_ptr,  # [batch, num_q_heads, head_dim] bf16/fp16
    stride_ob, stride_oh, stride_od,
    num_q_heads, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS_TILE: tl.constexpr, READY: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Merges a row's splits ``SPLITS_TILE`` at a time (running max and rescaled sums), so one compiled kernel
    serves every split count: a decode whose lists grow across a power of two of splits compiles nothing new.
    With READY the next launch may start once this one's programs run (module doc)."""
    wait_for_previous_grid(PDL)
    if READY:
        let_next_grid_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    b = row // num_q_heads
    qh = row % num_q_heads
    lanes = tl.arange(0, SPLITS_TILE)
    dims = tl.arange(0, HEAD_DIM)
    m_run = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    out = tl.zeros((HEAD_DIM,), tl.float32)
    for first in range(0, num_splits, SPLITS_TILE):
        splits = first + lanes
        split_ok = splits < num_splits
        partial = row * num_splits + splits
        m = tl.load(stats_ptr + partial * 2, mask=split_ok, other=float("-inf"))
        sums = tl.load(stats_ptr + partial * 2 + 1, mask=split_ok, other=0.0)
        acc = tl.load(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        kept = tl.exp2(m_run - base)
        weight = tl.exp2(m - base)
        total = total * kept + tl.sum(weight * sums, 0)
        out = out * kept + tl.sum(acc * weight[:, None], 0)
        m_run = m_new
    out = out / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + qh * stride_oh + dims * stride_od, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodePlan:
    """Launch settings and scratch of :func:`sparse_decode` / :func:`dense_decode` for one set of shapes.

    Made by :func:`plan_decode` once per decode step (or once for good: it holds no per-step data) and passed
    as ``plan=`` to every layer's call. ``acc`` / ``stats`` are scratch the calls overwrite, so calls sharing a
    plan must run in one stream order (as the layers of a step do).
    """
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    max_blocks: int  # widest list served: sel_idx.shape[2] (sparse) or block_table.shape[1] (dense)
    num_splits: int  # programs per (request, KV head); 1 writes the output without a combine pass
    chunk_blocks: int  # list entries per split of the widest list, a multiple of the largest tile (in blocks)
    tile_tokens: int
    num_warps: int
    num_stages: int
    acc: torch.Tensor | None  # [batch, num_q_heads, num_splits, head_dim] fp32 scratch; None with one split
    stats: torch.Tensor | None  # [batch, num_q_heads, num_splits, 2] fp32 scratch; None with one split


def plan_decode(q: torch.Tensor, key_cache: torch.Tensor, max_blocks: int, *,
                num_splits: int | None = None, dense: bool = False) -> DecodePlan:
    """Choose splits and tile and allocate the split scratch for calls shaped like ``q`` / ``key_cache``.

    Args:
        q: ``[batch, num_q_heads, head_dim]`` bf16/fp16 (any tensor of the calls' shape, dtype and device).
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` like the calls' caches.
        max_blocks: the widest list the plan serves: ``sel_idx.shape[2]`` for :func:`sparse_decode`,
            ``block_table.shape[1]`` for :func:`dense_decode`. Each shorter list (a short request in a wide
            table) is cut on the device into the plan's number of splits, each a multiple of the largest tile.
        num_splits: most programs per (request, KV head) (rounded down so none is left without list
            entries); default chosen from the work and the SM count.
        dense: tune for :func:`dense_decode` (every block) rather than :func:`sparse_decode`'s lists; either
            plan serves either call.
    Returns:
        A :class:`DecodePlan` to pass as ``plan=``.
    """
    _check_q_and_cache(q, key_cache, "key_cache")
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 0:
        raise ValueError(f"max_blocks={max_blocks!r}; expected an int >= 0")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits={num_splits}; expected a positive int or None")
    _check_bool("dense", dense)
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_splits is None:
        num_splits = _choose_num_splits(batch * num_kv_heads, max_blocks, block_size, q.device, dense)
    chunk_blocks = _chunk_blocks(max_blocks, num_splits, block_size)
    num_splits = max(1, cdiv(max_blocks, chunk_blocks))
    acc = stats = None
    if num_splits > 1:
        acc = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        stats = torch.empty(batch, num_q_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    tile_tokens, num_warps, num_stages = _choose_tile(chunk_blocks * block_size, dense)
    return DecodePlan(batch, num_q_heads, num_kv_heads, head_dim, block_size, max_blocks, num_splits, chunk_blocks,
                      tile_tokens, num_warps, num_stages, acc, stats)


def sparse_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, sel_idx: torch.Tensor, sel_count: torch.Tensor, *,
                  scale: float | None = None, out: torch.Tensor | None = None,
                  num_splits: int | None = None, plan: DecodePlan | None = None,
                  sel_rows: torch.Tensor | None = None, inputs_ready: bool = False) -> torch.Tensor:
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
        num_splits: most programs per (request, KV head) (see :func:`plan_decode`); not with ``plan``.
        plan: a :func:`plan_decode` result for these shapes with ``max_blocks >= max_sel``, reused across
            layers (no per-call planning or scratch allocation).
        sel_rows: optional ``[batch]`` int64, the row of ``sel_idx`` / ``sel_count`` (then ``[rows,
            num_kv_heads, ...]``, any number of rows) each request reads, e.g. its slot of lists kept across
            steps; each must be a valid row (not checked: no host sync).
        inputs_ready: promise that ``sel_idx``, ``sel_count``, ``sel_rows``, ``block_table`` and ``seq_lens`` were
            written before the kernel launched just ahead of this call (lists kept from an earlier step, tables
            set before the step): with PDL the attention starts on its first tile while that kernel finishes
            (module doc). Breaking the promise may read lists or tables from before their update.
    Returns:
        ``out``, ``[batch, num_q_heads, head_dim]`` in q's dtype.
    """
    _check_attention_inputs(q, key_cache, value_cache, block_table, seq_lens)
    _check_selection(q, key_cache, sel_idx, sel_count, sel_rows)
    plan = _resolve_plan(plan, q, key_cache, sel_idx.shape[2], num_splits)
    return _launch(plan, q, key_cache, value_cache, block_table, seq_lens, sel_idx, sel_count, scale, out, sel_rows,
                   _check_bool("inputs_ready", inputs_ready))


def dense_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, *, scale: float | None = None, out: torch.Tensor | None = None,
                 num_splits: int | None = None, plan: DecodePlan | None = None,
                 inputs_ready: bool = False) -> torch.Tensor:
    """Decode attention over every block of each request: :func:`sparse_decode` with implicit full lists.

    Same arguments and result as :func:`sparse_decode` without the lists (a ``plan`` must serve
    ``block_table.shape[1]`` blocks; ``inputs_ready`` promises ``block_table`` and ``seq_lens``). The work per
    request is bounded by ``block_table.shape[1]`` (no host sync on seq_lens), so a table much wider than the
    longest request spends programs that find no blocks.
    """
    _check_attention_inputs(q, key_cache, value_cache, block_table, seq_lens)
    plan = _resolve_plan(plan, q, key_cache, block_table.shape[1], num_splits, dense=True)
    return _launch(plan, q, key_cache, value_cache, block_table, seq_lens, None, None, scale, out, None,
                   _check_bool("inputs_ready", inputs_ready))


def _resolve_plan(plan: DecodePlan | None, q, key_cache, max_blocks: int, num_splits: int | None,
                  dense: bool = False) -> DecodePlan:
    """``plan`` checked against the call's shapes, or a fresh plan when none is given."""
    if plan is None:
        return plan_decode(q, key_cache, max_blocks, num_splits=num_splits, dense=dense)
    if num_splits is not None:
        raise ValueError(f"num_splits={num_splits} given with a plan; pass it to plan_decode instead")
    shapes = (q.shape[0], q.shape[1], key_cache.shape[2], q.shape[2], key_cache.shape[1])
    planned = (plan.batch, plan.num_q_heads, plan.num_kv_heads, plan.head_dim, plan.block_size)
    if shapes != planned or max_blocks > plan.max_blocks:
        raise ValueError(f"plan was made for (batch, num_q_heads, num_kv_heads, head_dim, block_size) = {planned} "
                         f"and lists of up to {plan.max_blocks} blocks; the call has {shapes} and {max_blocks}")
    if plan.acc is not None:
        check_device("plan.acc", plan.acc, q.device)
    return plan


_SPLIT, _COMBINE = Launcher(_sparse_decode_split_kernel), Launcher(_combine_splits_kernel)


def _launch(plan: DecodePlan, q, key_cache, value_cache, block_table, seq_lens, sel_idx, sel_count, scale, out,
            sel_rows=None, ready=False):
    """The split kernel (writing ``out`` itself with one split), then the combine kernel with several splits."""
    out = _check_or_alloc_out(q, out)
    head_dim = q.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    dense = sel_idx is None
    direct = plan.num_splits == 1
    # each tensor's strides read once: every stride(i) is a call into torch (~0.25 us, host time per layer)
    sel_strides = (0, 0, 0) if dense else sel_idx.stride()
    count_strides = (0, 0) if dense else sel_count.stride()
    q_strides, k_strides, v_strides = q.stride(), key_cache.stride(), value_cache.stride()
    table_strides, out_strides = block_table.stride(), out.stride()
    _SPLIT((plan.batch * plan.num_kv_heads, plan.num_splits),
        q_ptr=q, k_cache_ptr=key_cache, v_cache_ptr=value_cache, block_table_ptr=block_table,
        seq_lens_ptr=seq_lens, sel_idx_ptr=sel_idx, sel_count_ptr=sel_count, sel_rows_ptr=sel_rows, out_ptr=out,
        acc_ptr=plan.acc, stats_ptr=plan.stats,
        stride_qb=q_strides[0], stride_qh=q_strides[1], stride_qd=q_strides[2],
        stride_kb=k_strides[0], stride_kt=k_strides[1], stride_kh=k_strides[2], stride_kd=k_strides[3],
        stride_vb=v_strides[0], stride_vt=v_strides[1], stride_vh=v_strides[2], stride_vd=v_strides[3],
        stride_btb=table_strides[0], stride_btj=table_strides[1],
        stride_sib=sel_strides[0], stride_sih=sel_strides[1], stride_sij=sel_strides[2],
        stride_scb=count_strides[0], stride_sch=count_strides[1],
        stride_ob=out_strides[0], stride_oh=out_strides[1], stride_od=out_strides[2],
        num_kv_heads=plan.num_kv_heads, num_splits=plan.num_splits, chunk_blocks=plan.chunk_blocks,
        qk_scale_log2=scale * 1.4426950408889634,
        GROUP=plan.num_q_heads // plan.num_kv_heads,
        GROUP_PAD=max(16, next_pow2(plan.num_q_heads // plan.num_kv_heads)), HEAD_DIM=head_dim,
        BLOCK_SIZE=plan.block_size, DENSE=dense, DIRECT=direct,
        COMPUTE_DTYPE=compute_dtype(q.dtype),
        TILE_TOKENS=plan.tile_tokens, SEL_ROWS=sel_rows is not None, READY=ready,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if not direct:
        _COMBINE((plan.batch * plan.num_q_heads,),
            acc_ptr=plan.acc, stats_ptr=plan.stats, out_ptr=out,
            stride_ob=out_strides[0], stride_oh=out_strides[1], stride_od=out_strides[2],
            num_q_heads=plan.num_q_heads, num_splits=plan.num_splits,
            HEAD_DIM=head_dim, SPLITS_TILE=_SPLITS_TILE, READY=ready,
        )
    return out


def _choose_num_splits(num_heads: int, max_blocks: int, block_size: int, device: torch.device, dense: bool) -> int:
    """Splits per (request, KV head): enough programs for ``_PROGRAMS_PER_SM`` per SM (lists), or at most
    ``_DENSE_PROGRAMS_PER_SM`` per SM in whole (dense: at 8 x 128K 8 splits, 512 programs on 132 SMs, took 0.96
    ms where 17 took 1.03 on the H200, sweep_decode_tiles_92d5941-NVIDIA_H200-2026-12-04.json), none shorter than
    ``_MIN_TOKENS_PER_SPLIT`` tokens, at most ``_MAX_SPLITS``. The interpreter counts as one SM."""
    sms = sm_count(device)
    if dense:
        wanted = max(1, _DENSE_PROGRAMS_PER_SM * sms // max(num_heads, 1))
    else:
        wanted = cdiv(_PROGRAMS_PER_SM * sms, max(num_heads, 1))
    useful = cdiv(max_blocks * block_size, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def _chunk_blocks(max_blocks: int, num_splits: int, block_size: int) -> int:
    """List entries per split, a multiple of the largest tile (in blocks) so no split ends in a partial tile;
    the planner then drops the splits this rounding leaves empty."""
    align = cdiv(_MAX_TILE_TOKENS, block_size)
    return max(align, cdiv(cdiv(max_blocks, num_splits), align) * align)


def _choose_tile(split_tokens: int, dense: bool) -> tuple[int, int, int]:
    """(TILE_TOKENS, num_warps, num_stages) for splits of ``split_tokens`` list tokens.

    Dense: 64-token tiles, 4 warps, 2 stages, the best or within 1% of it at 1 x 128K, 8 x 128K and 32 x 32K
    on the H200 at the split counts of :func:`_choose_num_splits` (72 settings swept per shape,
    ``bench/sweep_decode_tiles.py``); 3-4 stages fell off a cliff at some split counts (1.25 ms against 0.96 at
    8 x 128K). Lists (below) were not re-swept on the H200.

    Triton 3.6 pipelines the gathered K/V loads with cp.async, but stages also go to the index loads ahead of
    them: compiled for sm_90 (head_dim 128, bf16), 3 stages give one K/V buffer (39 KB of shared memory at 64
    tokens), 5 stages two for the dense variant. Swept on the H100 (2026-11-25, CUDA-graph times, 8 tile
    settings x 3-5 split counts per shape): at the default split counts, 64-token tiles with 4 warps were
    within 3% of the sweep's best at four of five shapes (dense 8 x 128K; lists of 39K and 2K tokens at batch
    8; lists of 2K at batch 1) and 8% at dense 1 x 32K; 5 stages paid only for long splits (dense 8 x 128K).
    """
    if dense:
        return 64, 4, 2
    return 64, 4, 5 if split_tokens >= 4096 else 3


def _check_bool(name: str, value) -> bool:
    """``value``, which must be a bool (argument ``name``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}; expected True or False")
    return value


def _check_q_and_cache(q: torch.Tensor, cache: torch.Tensor, name: str) -> None:
    if q.dtype not in TL_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; expected torch.bfloat16 or torch.float16")
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [batch, num_q_heads, head_dim]")
    head_dim = q.shape[2]
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"q has head_dim {head_dim}; expected a power of two in [16, 256]")
    check_device(name, cache, q.device)
    if cache.dtype != q.dtype:
        raise ValueError(f"{name} has dtype {cache.dtype}; expected q's dtype {q.dtype}")
    if cache.dim() != 4 or cache.shape[3] != head_dim:
        raise ValueError(f"{name} has shape {tuple(cache.shape)}; expected "
                         f"[num_blocks, block_size, num_kv_heads, {head_dim}]")
    block_size, num_kv_heads = cache.shape[1], cache.shape[2]
    if block_size & (block_size - 1):
        raise ValueError(f"{name} has block_size {block_size}; expected a power of two")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q has {q.shape[1]} heads; expected a multiple of num_kv_heads={num_kv_heads}")


def _check_attention_inputs(q, key_cache, value_cache, block_table, seq_lens) -> None:
    _check_q_and_cache(q, key_cache, "key_cache")
    check_device("value_cache", value_cache, q.device)
    if value_cache.dtype != q.dtype:
        raise ValueError(f"value_cache has dtype {value_cache.dtype}; expected q's dtype {q.dtype}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache has shape {tuple(value_cache.shape)}; expected key_cache's "
                         f"{tuple(key_cache.shape)}")
    batch = q.shape[0]
    _check_int32("block_table", block_table, q.device, (batch, block_table.shape[-1]), "[batch, max_blocks_per_seq]")
    _check_int32("seq_lens", seq_lens, q.device, (batch,), "[batch]")


def _check_selection(q, key_cache, sel_idx, sel_count, sel_rows=None) -> None:
    batch, num_kv_heads = q.shape[0], key_cache.shape[2]
    rows, what = (batch, "batch") if sel_rows is None else (sel_idx.shape[0], "rows")
    _check_int32("sel_idx", sel_idx, q.device, (rows, num_kv_heads, sel_idx.shape[-1]),
                 f"[{what}, num_kv_heads, max_sel]")
    _check_int32("sel_count", sel_count, q.device, (rows, num_kv_heads), f"[{what}, num_kv_heads]")
    if sel_rows is not None:
        check_device("sel_rows", sel_rows, q.device)
        if sel_rows.dtype != torch.int64 or tuple(sel_rows.shape) != (batch,):
            raise ValueError(f"sel_rows has shape {tuple(sel_rows.shape)} dtype {sel_rows.dtype}; expected "
                             f"[batch] = ({batch},) torch.int64")


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
