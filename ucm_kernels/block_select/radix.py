"""The top-k of long lists (tables from ``MIN_BLOCKS`` blocks, rows of ``ROWS`` keys) in more programs than rows:
every program of a row finds the row's threshold from the whole row in registers by a radix select, then writes its
slice of the list.

At 1 x 128K and sparse_ratio 0.3 each (request, KV head) row picks 2458 of 8192 blocks. One program a row
(``triton.py``'s ``_select_kernel``) walks the row in chunks, a load's latency a step, about 21 us on the H200
(BENCHMARKS.md); the sliced top-k (``sliced.py``) only serves lists short enough that each slice keeps a quarter of
its blocks or fewer. Here one launch, ``_radix_topk_kernel``, runs a program per (slice of ``slice_blocks``, KV
head, request). Each holds the row's keys in registers (``next_pow2(max_blocks)`` of them) and finds the need-th
largest the same way, so no program waits for another:
1. the bits every competing key shares (from the smallest and largest), then ``DIGIT_BITS`` bits at a time a
   histogram of the still undecided keys' next digit (``tl.histogram``), whose counts from the top say which digit
   the need-th largest has; at most four rounds for 32-bit keys;
2. its slice's first list position, ``lo`` plus the keys above the threshold before the slice and the ties before
   it up to the ties wanted (ties go to the lowest logical blocks), then its picks in ascending order, and its share
   of the windows and -1 padding.

A row whose competing blocks end early (a short request in a wide table: vLLM's tables are max_model_len wide)
is searched in a register row cut to a half, a quarter or a sixteenth (``CUTS``, ``cut_rows``): the search's cost
follows the request, not the table. The lists are exactly the one-program kernel's (tests).

Four launches, one pass each (bounds, a histogram of the slices' digits merged by the row's last slice, the bin's
candidates, the lists), took as long as one program a row at 1 x 128K on the H200 (BENCHMARKS.md): each pass paid a
launch and a chain of dependent loads. ``plan_select`` takes this path where the sliced top-k does not apply and the
table is one this kernel was timed faster on (``choose_radix``).
"""
import functools

import triton
import triton.language as tl

from .._launch import Launcher, wait_for_previous_grid
from .._utils import cdiv, next_pow2
from ._rank import KEY_NONE, _common_prefix, _order_keys, _output_row, _row_plan, _write_windows

SLICES = 8  # slices a row is cut into, at most
MIN_SLICE = 256  # fewest blocks a slice holds (tests shrink it)
# Tables planned here: from 2048 blocks, in rows of 2048, 4096 or 8192 keys (the table's next power of two), where
# `bash bench/run_gpu.sh radix` timed this kernel faster than one program a row (H100, 734a15e: top-k 19.0 against
# 21.5 us at 1 x 128K, 18.5 against 22.1 at 2 x 128K; b3cf42b / 191b5c7: 9.8 against 11.1 at 1 x 32K) or, rows of
# 4096 keys, 1 us slower for a request that fills a 64K table (the top-k alone from normal scores, same process: 21.4
# against 20.4 at 35e234f; with Quest's scores the whole selection 29.3 against 29.0) and faster for a shorter one in
# it, as a vLLM engine's tables hold them (rows cut to the request: the selection at 4K 15.8 against 19.8 us, 16K
# 17.9 against 21.2, 32K 21.2 against 23.9; `run_gpu.sh wide`). Of the tables of 2049-4095 blocks none was timed.
# Rows of 16384 keys (8198 blocks) were slower (32.0 against 27.0); shorter tables were not timed, so of the rows of
# 2048 keys only a table of exactly 2048 blocks takes it (a 32K vLLM table; 2 x 32K was not timed either).
MIN_BLOCKS = 2048  # tests lower it
ROWS = (2048, 4096, 8192)  # tests and the A/B widen it
DIGIT_BITS = tl.constexpr(8)  # bits a histogram round decides
BINS = tl.constexpr(256)  # 2**DIGIT_BITS
KEY_MAX = tl.constexpr(2147483647)
# Row keys -> the divisors of ROW (up to three, ascending powers of two) that give the shorter register rows a
# request's competing blocks may be searched in (a 16K request in a 128K table: 2048 keys, not 8192). Timed on the
# H100 (35e234f, `radix_topk_ab --wide`, the top-k alone, us): rows of 8192 cut by 4 and 16 cost a request filling
# the table 1.1 (28.0 against 26.9) and save 9.3 at 16K and 13.0 at 4K; cut by 2 as well they also save 4.9 at 64K
# but cost 2.9 at 128K (the 4096-key search beside the full one). Rows of 4096 cut by 2, 4 and 16 cost 0.2 at 64K
# (21.6 against 21.4) and save 5.0 at 32K. Rows of 2048 (at 4 warps) spilled 8 bytes when cut (sm_90).
CUTS = {4096: (2, 4, 16), 8192: (4, 16)}  # tests and the A/B change it


def choose_radix(max_blocks: int, rows: int, sms: int, sliceable: bool) -> int:
    """Blocks a slice holds in the radix top-k of ``rows`` (request, KV head) rows over ``max_blocks``-block
    tables, or 0 for another path: up to ``SLICES`` slices of at least ``MIN_SLICE`` blocks (a power of two), at
    least two, the slice programs of all rows within one wave of ``sms`` SMs, the table at least ``MIN_BLOCKS``
    blocks and its rows of one of ``ROWS`` keys."""
    slice_blocks = max(MIN_SLICE, next_pow2(cdiv(max(max_blocks, 1), SLICES)))
    slices = cdiv(max_blocks, slice_blocks)
    if (not sliceable or slices < 2 or rows * slices > sms or max_blocks < MIN_BLOCKS
            or next_pow2(max_blocks) not in ROWS):
        return 0
    return slice_blocks


@triton.jit
def _radix_kth_largest(keys, k):
    """(threshold, above): the k-th largest (k >= 1) of the int32 ``keys`` (registers; KEY_NONE: no block, below
    every score's key) and how many are larger. The bits all of them share first, then DIGIT_BITS bits a round by a
    histogram of the undecided keys' next digit; ``found`` (offset binary, int64) holds the bits set so far and
    ``bit`` the next to decide."""
    found, bit = _common_prefix(tl.min(tl.where(keys == KEY_NONE, KEY_MAX, keys), axis=0), tl.max(keys, axis=0))
    above = (bit * 0).to(tl.int32)
    bins = tl.arange(0, BINS)
    while bit >= 0:
        low_bit = tl.maximum(bit + 1 - DIGIT_BITS, 0)
        first = (found - 2147483648).to(tl.int32)  # the undecided range's smallest and largest key
        last = (found + (1 << (bit + 1)) - 1 - 2147483648).to(tl.int32)
        undecided = (keys >= first) & (keys <= last)
        digits = ((keys - first).to(tl.uint32, bitcast=True) >> low_bit.to(tl.uint32)).to(tl.int32)
        counts = tl.histogram(digits, BINS, mask=undecided)
        at_least = above + tl.cumsum(counts, axis=0, reverse=True)  # keys in this digit's range or above it
        digit = tl.max(tl.where(at_least >= k, bins, 0), axis=0)
        above = tl.sum(tl.where(bins == digit, at_least - counts, 0), axis=0)
        found += digit.to(tl.int64) << low_bit
        bit = low_bit - 1
    return (found - 2147483648).to(tl.int32), above


@triton.jit
def _slice_first(keys, threshold, ties_wanted, before):
    """(first, tie budget) of a slice: the picks (keys above the threshold, ties up to ``ties_wanted``) among the
    keys where ``before`` holds (the slices ahead of it), and the ties left to it."""
    above = tl.sum((before & (keys > threshold)).to(tl.int32), axis=0)
    ties = tl.sum((before & (keys == threshold)).to(tl.int32), axis=0)
    return above + tl.minimum(ties, ties_wanted), ties_wanted - ties


@triton.jit
def _pick_slice(score_row, sel_row, part, lo, hi, need, stride_ij, SLICE: tl.constexpr, ROW: tl.constexpr,
                SHORTER: tl.constexpr):
    """When the row's competing blocks [lo, hi) end within (SHORTER, ROW] (ROW 0: compiled to nothing): slice
    ``part``'s picks of the row's ``need`` (>= 1) largest competing keys, the threshold found from the row's first
    ``ROW`` keys in registers (``score_row``: fp32 scores), written into the int32 list ``sel_row`` at their
    positions from ``lo``."""
    if ROW > 0:
        if (hi > SHORTER) & (hi <= ROW):
            r = tl.arange(0, ROW)
            j = part * SLICE + tl.arange(0, SLICE)
            row_valid = (r >= lo) & (r < hi)
            valid = (j >= lo) & (j < hi)
            row_keys = tl.where(row_valid, _order_keys(tl.load(score_row + r, mask=row_valid, other=0.0)), KEY_NONE)
            # the slice's keys loaded again (from L1 / L2): a slice of a register tensor cannot be taken in Triton
            keys = tl.where(valid, _order_keys(tl.load(score_row + j, mask=valid, other=0.0)), KEY_NONE)
            threshold, above = _radix_kth_largest(row_keys, need)
            first, tie_budget = _slice_first(row_keys, threshold, need - above, r < part * SLICE)
            tie = valid & (keys == threshold)
            take = (valid & (keys > threshold)) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= tie_budget))
            tl.store(sel_row + (lo + first + tl.cumsum(take.to(tl.int32), axis=0) - 1) * stride_ij, j, mask=take)


@triton.jit(do_not_specialize=["max_blocks", "width"])
def _radix_topk_kernel(
    scores_ptr,  # [batch, num_kv_heads, >= max_blocks] fp32
    seq_lens_ptr,  # [batch]
    reselect_ptr,  # [batch] rows to select (read if MASKED; any pointer otherwise)
    sel_rows_ptr,  # [batch] int64 row of sel_idx / sel_count each request writes (read if SEL_ROWS)
    sel_idx_ptr,  # [batch or rows, num_kv_heads, width] int32
    sel_count_ptr,  # [batch or rows, num_kv_heads] int32
    max_blocks, width, ratio_fixed, k_floor, init_window, local_window,
    stride_sb, stride_sh,
    stride_ib, stride_ih, stride_ij,
    stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, SLICE: tl.constexpr, ROW: tl.constexpr, CUT_1: tl.constexpr, CUT_2: tl.constexpr,
    CUT_3: tl.constexpr, MASKED: tl.constexpr, SEL_ROWS: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Program (slice, KV head, request): the row's threshold from all its keys (in a register row of ``ROW``, or
    of the shortest of ``CUT_1`` / ``CUT_2`` / ``CUT_3`` that holds them, 0 for a cut not made: :func:`cut_rows`),
    then the slice's part of the list; slice 0 writes the count."""
    wait_for_previous_grid(PDL)
    part = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if MASKED:
        if tl.load(reselect_ptr + b) == 0:
            return
    _, _, count, lo, hi, need = _row_plan(seq_lens_ptr, b, max_blocks, ratio_fixed, k_floor, init_window,
                                          local_window, BLOCK_SIZE)
    out_b = _output_row(sel_rows_ptr, b, SEL_ROWS)
    sel_row = sel_idx_ptr + out_b * stride_ib + head * stride_ih
    picked = tl.maximum(need, 0)
    if need > 0:
        score_row = scores_ptr + b * stride_sb + head * stride_sh
        # a short request in a wide table (a vLLM engine's) searches the shortest row that holds its competing
        # blocks: one of the cuts (CUT_1 > CUT_2 > CUT_3, 0 where not made: cut_rows) or the whole row
        _pick_slice(score_row, sel_row, part, lo, hi, need, stride_ij, SLICE, CUT_3, 0)
        _pick_slice(score_row, sel_row, part, lo, hi, need, stride_ij, SLICE, CUT_2, CUT_3)
        _pick_slice(score_row, sel_row, part, lo, hi, need, stride_ij, SLICE, CUT_1, CUT_2)
        _pick_slice(score_row, sel_row, part, lo, hi, need, stride_ij, SLICE, ROW, CUT_1)
    # the slice's share of the list's positions (j again: held across the search, it spilled at 16384 keys)
    _write_windows(sel_row, part * SLICE + tl.arange(0, SLICE), lo, hi, picked, count, width, stride_ij)
    if part == 0:
        tl.store(sel_count_ptr + out_b * stride_ob + head * stride_oh, count)


_RADIX = Launcher(_radix_topk_kernel)


def num_warps(row: int) -> int:
    """Warps of a program holding ``row`` keys: 4 up to 2048 keys, 16 above (compiled for sm_90, 8 warps spilled
    over 8192 keys and over 4096; 16 hold 8192 in 93 registers and 16384 in 128)."""
    return 4 if row <= 2048 else 16


def cut_rows(row: int) -> tuple[int, int, int]:
    """(CUT_1, CUT_2, CUT_3): ``row`` divided by each of its CUTS, 0 for the cuts not made. Raises ValueError naming
    radix.CUTS for divisors that are not up to three ascending powers of two in (1, row]."""
    return _cut_sizes(row, tuple(CUTS.get(row, ())))


@functools.lru_cache(maxsize=None)
def _cut_sizes(row: int, divisors: tuple) -> tuple[int, int, int]:
    """:func:`cut_rows` of ``divisors``, checked once per setting (a launch pays a dict lookup and a cache hit)."""
    powers = all(isinstance(d, int) and not isinstance(d, bool) and 1 < d <= row and d & (d - 1) == 0
                 for d in divisors)
    if len(divisors) > 3 or not powers or list(divisors) != sorted(set(divisors)):
        raise ValueError(f"radix.CUTS[{row}]={divisors!r}: expected up to three ascending powers of two in (1, {row}]")
    return tuple([row // divisor for divisor in divisors] + [0] * (3 - len(divisors)))


def launch_radix(plan, scores, seq_lens, sel_idx, sel_count, reselect, sel_rows) -> None:
    """The radix top-k of ``plan`` (a ``SelectPlan`` with ``radix_slice`` > 0): each (KV head, request) row of
    ``scores`` (``[batch, heads, >= max_blocks]`` fp32) into ``sel_idx`` / ``sel_count`` (only the rows
    ``reselect`` names, unless None; at the rows ``sel_rows`` names, if given); same lists as ``_select_kernel``."""
    row = next_pow2(plan.max_blocks)
    cut_1, cut_2, cut_3 = cut_rows(row)
    # each tensor's strides read once: every stride(i) is a call into torch (~0.25 us, host time per layer)
    score_strides, idx_strides, count_strides = scores.stride(), sel_idx.stride(), sel_count.stride()
    _RADIX((cdiv(plan.max_blocks, plan.radix_slice), plan.num_kv_heads, plan.batch),
        scores_ptr=scores, seq_lens_ptr=seq_lens, reselect_ptr=seq_lens if reselect is None else reselect,
        sel_rows_ptr=seq_lens if sel_rows is None else sel_rows, sel_idx_ptr=sel_idx, sel_count_ptr=sel_count,
        width=sel_idx.shape[2], **plan.limits,
        stride_sb=score_strides[0], stride_sh=score_strides[1],
        stride_ib=idx_strides[0], stride_ih=idx_strides[1], stride_ij=idx_strides[2],
        stride_ob=count_strides[0], stride_oh=count_strides[1],
        BLOCK_SIZE=plan.block_size, SLICE=plan.radix_slice, ROW=row, CUT_1=cut_1, CUT_2=cut_2, CUT_3=cut_3,
        MASKED=reselect is not None, SEL_ROWS=sel_rows is not None, num_warps=num_warps(row),
    )
