"""The top-k of short lists over long rows in more programs than rows: each slice of a row keeps its own best
``need`` keys, then the row's last slice to finish picks the row's best ``need`` among the slices' candidates.

With one program a (request, KV head) row (``triton.py``'s ``_select_kernel``), a batch of one request has eight
programs on a GPU of 132 SMs, each walking 8192 keys in passes (about 15 us fixed and 15 of search at 1 x 128K on
the H200, BENCHMARKS.md). When a row picks few of its blocks (a token budget: 128 of 8192), the picks of the whole
row are among the picks of its slices: the order (key descending, logical block ascending) is total, the row's
``need`` best are a prefix of it, and so the row's best within any slice are a prefix of that slice's ``need``
best. So one launch, ``_sliced_topk_kernel``, runs a program per (slice of ``SLICE`` blocks, KV head, request):
1. the slice's keys in registers, its ``need``-th largest by the bitwise search of ``_rank`` (no pass over memory),
   and the blocks above it plus the first ties, ascending, into a candidate row of ``KEEP`` entries (the list
   width's next power of two) with their keys;
2. the row's last slice program to finish (an arrival count per row, reset by that program for the next launch)
   loads every slice's candidates (slice after slice: ascending logical blocks), finds the ``need``-th largest among
   them and writes the list in one pass: the init window, the picks (ties to the lowest logical blocks, as the
   one-program kernel), the local window, -1 padding.

Two launches (the merge as a kernel of its own) were 1.2-1.3 us slower at 1 x 128K on the H100
(``sliced_topk_ab-NVIDIA_H100_80GB_HBM3-2026-12-06-bcc13ef.json``).

The lists are exactly the one-program kernel's. ``plan_select`` takes this path where it prunes (see
``choose_slicing``); the gauss rule, whose shares need the whole row first, never does.
"""
import triton
import triton.language as tl

from .._launch import Launcher, wait_for_previous_grid
from .._utils import cdiv, next_pow2
from ._rank import KEY_NONE, _common_prefix, _finish_search, _order_keys, _output_row, _row_plan, _write_windows

SLICE = 1024  # blocks a slice program holds in registers ([SLICE, 16] counts a search round; tests shrink it)
MIN_PRUNE = 4  # a slice keeps at most 1 / MIN_PRUNE of its blocks, or the row takes the one-program path
MERGE_KEYS = 2048  # most candidates the merge program holds ([MERGE_KEYS, 4] counts a round)
_WARPS = 8  # 4 or 8 warps for either stage were within 1.5 us at 1 x 128K (H100, fa320e9)


def choose_slicing(max_blocks: int, width: int, rows: int, sms: int, sliceable: bool) -> int:
    """Slices a row is cut into for the sliced top-k of lists up to ``width`` entries over ``max_blocks``-block
    tables, or 0 for one program a row: at least two slices, each keeping at most ``1 / MIN_PRUNE`` of its blocks
    (``next_pow2(width)`` candidates), all of them within ``MERGE_KEYS``, and the slice programs of all ``rows``
    (request, KV head) rows within one wave of ``sms`` SMs. Where rows alone fill the GPU, one program a row is
    faster: at a 2048-token budget on the H100 (Quest, bf16 reprs), 8 x 128K (64 rows, 512 slice programs) selected
    in 139 us sliced against 129, 1 x 128K (8 rows, 64 programs) in 40.5 against 44.0 (``sliced_topk_ab``)."""
    slices = cdiv(max_blocks, SLICE)
    keep = next_pow2(max(width, 1))
    if (not sliceable or slices < 2 or keep * MIN_PRUNE > SLICE or next_pow2(slices) * keep > MERGE_KEYS
            or rows * slices > sms):
        return 0
    return slices


@triton.jit
def _keep_slice_best(score_row, cand_row, count_row, part, lo, hi, need, stride_cs, SLICE: tl.constexpr,
                     KEEP: tl.constexpr):
    """Slice ``part`` of a row: its competing blocks' keys, their ``need`` best (ascending) into the slice's
    candidate row (keys, then blocks), and how many into ``count_row[part]``."""
    j = part * SLICE + tl.arange(0, SLICE)
    competing = (j >= lo) & (j < hi) & (need > 0)
    scores = tl.load(score_row + j, mask=competing, other=0.0)
    keys = tl.where(competing, _order_keys(scores), KEY_NONE)
    take = _best(keys, competing, need, 4)
    positions = tl.cumsum(take.to(tl.int32), axis=0)
    row = cand_row + part * stride_cs
    tl.store(row + positions - 1, keys, mask=take)
    tl.store(row + KEEP + positions - 1, j, mask=take)
    tl.store(count_row + part, tl.sum(take.to(tl.int32), axis=0))


@triton.jit
def _best(keys, valid, need, RADIX_BITS: tl.constexpr):
    """Which of the valid ``keys`` (registers, in ascending logical order) are among their ``need`` best: those
    above the need-th largest, then its ties in order; all of them when there are at most ``need``."""
    n = tl.sum(valid.to(tl.int32), axis=0)
    take = valid
    if n > need:
        lowest = tl.min(tl.where(valid, keys, 2147483647), axis=0)
        highest = tl.max(tl.where(valid, keys, KEY_NONE), axis=0)
        found, bit = _common_prefix(lowest, highest)
        found, above = _finish_search(keys, found, found * 0, bit, need, RADIX_BITS)
        threshold = (found - 2147483648).to(tl.int32)
        tie = valid & (keys == threshold)
        ties_wanted = need - above.to(tl.int32)
        take = (valid & (keys > threshold)) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= ties_wanted))
    return take


@triton.jit
def _merge_row(cand_row, count_row, sel_row, count_out, slices, width, count, lo, hi, need, stride_cs, stride_ij,
               KEEP: tl.constexpr, KEYS: tl.constexpr, SCAN: tl.constexpr):
    """A row's list from its slices' candidates: the ``need`` best among them (read past L1: other programs wrote
    them), then the windows and -1 padding, in ascending order; its count into ``count_out``."""
    e = tl.arange(0, KEYS)
    part = e // KEEP
    slot = e % KEEP
    held = tl.load(count_row + part, mask=(part < slices) & (need > 0), other=0, cache_modifier=".cg")
    valid = slot < held
    at = cand_row + part * stride_cs + slot
    keys = tl.load(at, mask=valid, other=KEY_NONE, cache_modifier=".cg")
    blocks = tl.load(at + KEEP, mask=valid, other=0, cache_modifier=".cg")
    take = _best(keys, valid, need, 2)
    picked = tl.sum(take.to(tl.int32), axis=0)
    tl.store(sel_row + (lo + tl.cumsum(take.to(tl.int32), axis=0) - 1) * stride_ij, blocks, mask=take)
    offs = tl.arange(0, SCAN)
    for first in range(0, width, SCAN):
        _write_windows(sel_row, first + offs, lo, hi, picked, count, width, stride_ij)
    tl.store(count_out, count)


@triton.jit(do_not_specialize=["max_blocks", "width", "slices"])
def _sliced_topk_kernel(
    scores_ptr,  # [batch, num_kv_heads, >= max_blocks] fp32
    seq_lens_ptr,  # [batch]
    reselect_ptr,  # [batch] rows to select (read if MASKED; any pointer otherwise)
    sel_rows_ptr,  # [batch] int64 row of sel_idx / sel_count each request writes (read if SEL_ROWS)
    cand_ptr,  # [batch, num_kv_heads, slices, 2, KEEP] int32: each slice's candidate keys, then their blocks
    cand_count_ptr,  # [batch, num_kv_heads, slices] int32
    arrivals_ptr,  # [batch, num_kv_heads] int32, zero between launches: slices of the row done so far
    sel_idx_ptr,  # [batch or rows, num_kv_heads, width] int32
    sel_count_ptr,  # [batch or rows, num_kv_heads] int32
    max_blocks, width, slices, ratio_fixed, k_floor, init_window, local_window,
    stride_sb, stride_sh,
    stride_cb, stride_ch, stride_cs,
    stride_nb, stride_nh,
    stride_ab,
    stride_ib, stride_ih, stride_ij,
    stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, SLICE: tl.constexpr, KEEP: tl.constexpr, KEYS: tl.constexpr, SCAN: tl.constexpr,
    MASKED: tl.constexpr, SEL_ROWS: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Both stages in one launch: every slice program keeps its best, and the row's last to finish (counted on
    ``arrivals``, which it resets) merges them."""
    wait_for_previous_grid(PDL)
    part = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if MASKED:
        if tl.load(reselect_ptr + b) == 0:
            return
    _, nb, count, lo, hi, need = _row_plan(seq_lens_ptr, b, max_blocks, ratio_fixed, k_floor, init_window,
                                           local_window, BLOCK_SIZE)
    cand_row = cand_ptr + b * stride_cb + head * stride_ch
    count_row = cand_count_ptr + b * stride_nb + head * stride_nh
    _keep_slice_best(scores_ptr + b * stride_sb + head * stride_sh, cand_row, count_row, part, lo, hi, need,
                     stride_cs, SLICE, KEEP)
    tl.debug_barrier()  # every thread's candidates are stored before the row's count goes up (release, below)
    arrival = arrivals_ptr + b * stride_ab + head
    if tl.atomic_add(arrival, 1, sem="acq_rel", scope="gpu") == slices - 1:
        tl.store(arrival, 0)
        out_b = _output_row(sel_rows_ptr, b, SEL_ROWS)
        _merge_row(cand_row, count_row, sel_idx_ptr + out_b * stride_ib + head * stride_ih,
                   sel_count_ptr + out_b * stride_ob + head * stride_oh, slices, width, count, lo, hi, need,
                   stride_cs, stride_ij, KEEP, KEYS, SCAN)


_SLICED = Launcher(_sliced_topk_kernel)


def launch_sliced(plan, scores, seq_lens, sel_idx, sel_count, reselect, sel_rows) -> None:
    """The sliced top-k of ``plan`` (a ``SelectPlan`` with ``slices`` > 0): each (KV head, request) row of
    ``scores`` (``[batch, heads, >= max_blocks]`` fp32) into ``sel_idx`` / ``sel_count`` (only the rows
    ``reselect`` names, unless None; at the rows ``sel_rows`` names, if given); same lists as ``_select_kernel``."""
    cand, held, arrivals = plan.candidates, plan.candidate_counts, plan.arrivals
    keep = cand.shape[4]
    # each tensor's strides read once: every stride(i) is a call into torch (~0.25 us, host time per layer)
    score_strides, cand_strides, held_strides = scores.stride(), cand.stride(), held.stride()
    idx_strides, count_strides = sel_idx.stride(), sel_count.stride()
    _SLICED((plan.slices, plan.num_kv_heads, plan.batch),
        scores_ptr=scores, seq_lens_ptr=seq_lens, reselect_ptr=seq_lens if reselect is None else reselect,
        sel_rows_ptr=seq_lens if sel_rows is None else sel_rows, cand_ptr=cand, cand_count_ptr=held,
        arrivals_ptr=arrivals, sel_idx_ptr=sel_idx, sel_count_ptr=sel_count, width=sel_idx.shape[2],
        slices=plan.slices, **plan.limits,
        stride_sb=score_strides[0], stride_sh=score_strides[1],
        stride_cb=cand_strides[0], stride_ch=cand_strides[1], stride_cs=cand_strides[2],
        stride_nb=held_strides[0], stride_nh=held_strides[1], stride_ab=arrivals.stride(0),
        stride_ib=idx_strides[0], stride_ih=idx_strides[1], stride_ij=idx_strides[2],
        stride_ob=count_strides[0], stride_oh=count_strides[1],
        BLOCK_SIZE=plan.block_size, SLICE=plan.slice_blocks, KEEP=keep, KEYS=next_pow2(plan.slices) * keep,
        SCAN=min(1024, keep * 4), MASKED=reselect is not None, SEL_ROWS=sel_rows is not None, num_warps=_WARPS,
    )
