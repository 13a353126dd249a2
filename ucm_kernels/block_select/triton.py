"""Triton kernels and launcher of GSA block selection: score every full block, then top-k per (request, KV head).

Two launches, both reading each input once:
1. ``_score_kernel``, one program per (tile of logical blocks, request): gathers the tile's reprs of every KV
   head through the block table (a block's reprs are one contiguous ``num_kv_heads x head_dim`` row, so the
   loads are whole 16-byte vectors of long runs) and writes fp32 scores into a ``[batch, num_kv_heads,
   max_blocks]`` scratch. Only the blocks that compete for selection are read (not the windows, not dense
   requests).
2. ``_select_kernel``, one program per (KV head, request): writes the row's order-preserving int32 keys into a
   scratch row (the competing blocks only; the gauss rule's summed shares, see below) with their smallest and
   largest, finds the k-th largest key by a bitwise search from the top bit down (the bits above the highest one
   where the smallest and largest keys differ are theirs; each lower bit is one counting pass over the row while
   more than a chunk of keys is undecided, then the undecided keys are copied out once and the rest of the bits
   found four at a time from registers), then writes the windows, the blocks above that threshold and the first
   ties, in ascending logical order (cumsum positions), and pads with -1. Each counting pass reads the row in
   chunks of ``select_chunk`` keys (1024, one 16-byte load a thread of 8 warps; a row of 8K keys is 32 KB, meant to
   stay in L1) and reduces once, so its cost follows the table's width, not the next power of two (a 128K-token
   request a few tokens into decode has 8198 blocks); the passes that scan (the copy, the list writing) take four
   chunks a step. Before (one row held in registers, 32 counting steps over ``next_pow2(max_blocks)`` entries, up
   to 16 warps), whole decode steps at 1 x 128K (8198-block tables) spent about 47 us a layer in this program on a
   reselecting step against about 12 in the score kernel (H200 ``decode_step_profile`` JSON). Measured since
   (BENCHMARKS.md, "Where a layer's select + attend goes"): chunked, 1.3x faster at 8195 blocks and 0.92x at 8192;
   the register finish of the search, no faster (the time is not in the counting passes); the four-chunk scans
   1.11x at 1 x 8192 blocks, 1.01-1.04x elsewhere (they cut the fixed part, not the search). The search finishes
   from registers once at most ``select_finish`` keys (min(chunk, 1024)) are undecided, so the streaming chunk
   can grow past what the finish's [keys, 16] counts hold; a row of one chunk is counted from the registers its
   keys were made in (no reload per pass). tests/kernels/test_sm90_compile.py compiles the kernel for sm_90 here
   and checks ptxas' registers and spills.
   Alternatives measured on the H100 with the register-resident row (8 requests x 8K blocks, whole selection under
   a CUDA graph, Quest / mean): two bits per step with three counts packed in one int64 reduction, 0.136 / 0.087
   ms; a radix select over four 256-bin ``tl.histogram`` passes, 0.169 / 0.121 ms; one bit per step, 0.129 /
   0.082 ms.

Short lists over long rows at a small batch (a token budget at 1 x 128K: eight rows of 8192 blocks) take the sliced
top-k of ``sliced.py`` instead: programs per slice of a row keep their best, the row's last to finish merges them
(same lists). Long lists over tables of 2048 or 2049-8192 blocks (sparse_ratio 0.3 at 1 x 32K, 1 x 64K, 1 or 2 x
128K) take ``radix.py``'s: every program of a row finds the threshold from the row in registers (cut to a short
request's blocks in a wide table) by histograms of 8-bit digits, then writes its slice (same lists).

:func:`plan_select` does the host-side work (scalar checks, k rule, launch settings, scratch) once per step;
``SelectPlan.run`` per layer only checks the tensors and launches.

GQA: the scores of the group's query heads are summed. For Quest the sum of per-head upper bounds is
``sum_d kmax_d * sum_g max(q_gd, 0) + kmin_d * sum_g min(q_gd, 0)``, so a block costs one pass over its
kmin/kmax whatever the group size; the mean rule is ``kmean . sum_g q_g``. The gauss rule adds the group's
per-head shares of estimated attention mass, which need every full block's estimate before any share: the score
kernel writes one log-mass row per query head (every full block of a sparse request, windows included; a
``[batch, num_q_heads, max_blocks]`` scratch), and the top-k program turns each of its group's rows into softmax
shares over the full blocks and adds them before its search (same bytes of reprs read as Quest).

fp8 (e4m3fn) reprs are read as bytes, widened to fp32 and their block's score multiplied by its ``kscale``
(a power of two, see ``ucm_kernels.block_repr``): Quest then reads 2 x head_dim + 4 bytes per (block, KV head)
instead of 4 x head_dim, and since kmin/kmax were rounded outward its score still bounds the exact one.
"""
import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._launch import Launcher, wait_for_previous_grid
from .._utils import (INDEX_DTYPES, cdiv, check_device, check_tensor, next_pow2, padded_empty, sm_count,
                      triton_interpreting)
from . import radix as radix_top_k
from . import sliced as sliced_top_k
from ._rank import _common_prefix, _finish_search, _order_keys, _output_row, _plan, _row_plan

FP8 = torch.float8_e4m3fn
REPR_DTYPES = (torch.bfloat16, torch.float16, torch.float32, FP8)
Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCORES = ("quest", "mean", "gauss")  # a rule's RULE in the kernels is its index here
QUEST, MEAN, GAUSS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
RATIO_ONE = 1 << 32  # sparse_ratio is applied in 32-bit fixed point, rounded down
MAX_TABLE_BLOCKS = 1 << 16  # widest block table (1M tokens at 16)
_SELECT_CHUNK = 1024  # row entries the top-k program reads per step of a pass (tests shrink it)
_SCAN_CHUNKS = 4  # chunks per step of the top-k's passes that scan (copying the undecided keys, writing the lists)
_SELECT_FINISH = 1024  # most undecided keys the search finishes from registers ([keys, 16] counts; tests shrink it)


@triton.jit(do_not_specialize=["max_blocks"])
def _score_kernel(
    q_ptr,  # [batch, num_q_heads, head_dim]
    kmin_ptr, kmax_ptr, kmean_ptr,  # [num_blocks, num_kv_heads, head_dim], same strides; unused: any repr
    kscale_ptr,  # [num_blocks, num_kv_heads] fp32 scale of fp8 reprs (read if SCALED; any pointer otherwise)
    block_table_ptr,  # [batch, max_blocks]
    seq_lens_ptr,  # [batch]
    reselect_ptr,  # [batch] rows to select (read if MASKED; any pointer otherwise)
    scores_ptr,  # [batch, num_kv_heads, max_blocks] fp32 scratch
    max_blocks, ratio_fixed, k_floor, init_window, local_window, sm_scale,
    stride_qb, stride_qh, stride_qd,
    stride_rb, stride_rh, stride_rd,
    stride_kscale_b, stride_kscale_h,
    stride_tb, stride_tj,
    stride_sb, stride_sh,
    BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, RULE: tl.constexpr, TILE: tl.constexpr,
    SCALED: tl.constexpr, MASKED: tl.constexpr, PDL: tl.constexpr = 0,
):
    wait_for_previous_grid(PDL)
    tile = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if MASKED:
        if tl.load(reselect_ptr + b) == 0:
            return
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    nb, count, lo, hi = _plan(seq_len, max_blocks, ratio_fixed, k_floor, init_window, local_window, BLOCK_SIZE)
    if RULE == GAUSS:  # every full block is scored: the softmax over them normalises each head's shares
        sparse = lo < hi
        lo = tl.where(sparse, 0, lo)
        hi = tl.where(sparse, tl.minimum(seq_len // BLOCK_SIZE, max_blocks), hi)
    if (tile * TILE >= hi) | ((tile + 1) * TILE <= lo):
        return
    j = tile * TILE + tl.arange(0, TILE)
    competing = (j >= lo) & (j < hi)
    phys = tl.load(block_table_ptr + b * stride_tb + j * stride_tj, mask=competing, other=0).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < HEADS
    d_ok = d < HEAD_DIM
    # [TILE, HEADS_PAD, BLOCK_D]: every head of a block at once, its whole repr row contiguous in memory
    offsets = phys[:, None, None] * stride_rb + h[None, :, None] * stride_rh + d[None, None, :] * stride_rd
    mask = competing[:, None, None] & h_ok[None, :, None] & d_ok[None, None, :]
    tile_ok = competing[:, None] & h_ok[None, :]
    scales = 1.0
    if SCALED:
        scales = tl.load(kscale_ptr + phys[:, None] * stride_kscale_b + h[None, :] * stride_kscale_h, mask=tile_ok,
                         other=0.0)
    out = scores_ptr + b * stride_sb + j[:, None]
    if RULE == GAUSS:
        _gauss_log_mass(q_ptr + b * stride_qb, kmin_ptr + offsets, kmax_ptr + offsets, mask, scales, sm_scale, out,
                        tile_ok, h, d, h_ok, d_ok, stride_qh, stride_qd, stride_sh, GROUP, SCALED)
    else:  # Quest or mean: one score per (block, KV head), the group's query heads summed
        g = tl.arange(0, BLOCK_G)
        q_rows = (h[:, None, None] * GROUP + g[None, :, None]) * stride_qh + d[None, None, :] * stride_qd
        q_ok = h_ok[:, None, None] & (g[None, :, None] < GROUP) & d_ok[None, None, :]
        # [HEADS_PAD, BLOCK_G, BLOCK_D]
        q = tl.load(q_ptr + b * stride_qb + q_rows, mask=q_ok, other=0.0).to(tl.float32)
        if RULE == QUEST:
            q_pos = tl.sum(tl.maximum(q, 0.0), axis=1)
            q_neg = tl.sum(tl.minimum(q, 0.0), axis=1)
            lows = tl.load(kmin_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            highs = tl.load(kmax_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            scores = tl.sum(highs * q_pos[None, :, :] + lows * q_neg[None, :, :], axis=2)
        else:
            means = tl.load(kmean_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            scores = tl.sum(means * tl.sum(q, axis=1)[None, :, :], axis=2)
        tl.store(out + h[None, :] * stride_sh, scores * scales, mask=tile_ok)


@triton.jit
def _gauss_log_mass(q_row, kmin_tile, kmax_tile, mask, scales, sm_scale, out, tile_ok, h, d, h_ok, d_ok,
                    stride_qh, stride_qd, stride_sh, GROUP: tl.constexpr, SCALED: tl.constexpr):
    """The gauss rule's first pass: each query head's estimated log attention mass on each block of the tile,
    ``sm_scale q.c + sm_scale**2 / 6 * sum_d q_d**2 r_d**2`` (box centre c, half-width r, both times the fp8
    scale), stored at the query head's row of the scratch (its KV head's row times GROUP plus its place)."""
    lows = tl.load(kmin_tile, mask=mask, other=0.0).to(tl.float32)
    highs = tl.load(kmax_tile, mask=mask, other=0.0).to(tl.float32)
    centre = (highs + lows) * 0.5
    spread = (highs - lows) * (highs - lows) * 0.25
    for g in tl.static_range(GROUP):
        rows = h * GROUP + g
        q = tl.load(q_row + rows[:, None] * stride_qh + d[None, :] * stride_qd, mask=h_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)  # [HEADS_PAD, BLOCK_D]
        linear = tl.sum(centre * q[None, :, :], axis=2)
        square = tl.sum(spread * (q * q)[None, :, :], axis=2)
        if SCALED:
            linear *= scales
            square *= scales * scales
        tl.store(out + rows[None, :] * stride_sh, sm_scale * linear + sm_scale * sm_scale / 6.0 * square,
                 mask=tile_ok)


@triton.jit
def _count_at_least(key_row, row_keys, candidate, N_CHUNKS: tl.constexpr, CHUNK: tl.constexpr):
    """How many keys of the row are >= candidate (int32): from ``row_keys`` (the row in registers) when it is one
    chunk, else from the scratch row with per-slot counts over the chunks; one reduction."""
    if N_CHUNKS == 1:
        counts = (row_keys >= candidate).to(tl.int32)
    else:
        offs = tl.arange(0, CHUNK)
        counts = tl.zeros([CHUNK], tl.int32)
        for c in range(N_CHUNKS):
            counts += (tl.load(key_row + c * CHUNK + offs) >= candidate).to(tl.int32)
    return tl.sum(counts, axis=0)


@triton.jit
def _kth_largest_key(key_row, row_keys, undecided_row, lo, hi, lowest, highest, k, N_CHUNKS: tl.constexpr,
                     CHUNK: tl.constexpr, SCAN: tl.constexpr, FINISH: tl.constexpr):
    """(T, above): the largest int32 T with at least k (>= 1) of the row's competing keys (logical blocks [lo, hi),
    spanning [lowest, highest]) >= T, and how many are > T.

    T's bits are set from the top down in offset binary (key + 2**31), keeping ``found`` (the bits so far) and
    ``above`` (keys >= found + 2**(bit + 1), the end of the still undecided range). The bits above the highest one
    where lowest and highest differ are theirs. Each lower bit costs a counting pass over the row
    (:func:`_count_at_least`) while the undecided range holds more than FINISH keys; then one pass copies those
    keys into ``undecided_row`` (FINISH entries) and the rest of the bits are found four at a time from registers
    (15 counts, one reduction).
    """
    found, bit = _common_prefix(lowest, highest)
    at_least_found = (hi - lo).to(tl.int64)  # every competing key is >= found
    above = found * 0
    while (bit >= 0) & (at_least_found - above > FINISH):
        candidate = found | (1 << bit)
        count = _count_at_least(key_row, row_keys, (candidate - 2147483648).to(tl.int32), N_CHUNKS,
                                CHUNK).to(tl.int64)
        found = tl.where(count >= k, candidate, found)
        at_least_found = tl.where(count >= k, count, at_least_found)
        above = tl.where(count >= k, above, count)
        bit -= 1
    if bit >= 0:
        _copy_undecided(key_row, undecided_row, lo, hi, found, bit, N_CHUNKS, CHUNK, SCAN)
        tl.debug_barrier()  # every thread's copies are in the scratch before any thread loads them
        offs = tl.arange(0, FINISH)
        keys = tl.load(undecided_row + offs, mask=offs < at_least_found - above, other=-2147483648)
        found, above = _finish_search(keys, found, above, bit, k, 4)
    return (found - 2147483648).to(tl.int32), above.to(tl.int32)


@triton.jit
def _copy_undecided(key_row, undecided_row, lo, hi, found, bit, N_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                    SCAN: tl.constexpr):
    """Copy the competing keys in [found, found + 2**(bit + 1)) (offset binary) to the front of undecided_row,
    SCAN entries of the row (a few chunks) per scan."""
    first = (found - 2147483648).to(tl.int32)
    last = (found + (1 << (bit + 1)) - 1 - 2147483648).to(tl.int32)
    offs = tl.arange(0, SCAN)
    copied = lo * 0
    for c in range((N_CHUNKS * CHUNK + SCAN - 1) // SCAN):
        j = c * SCAN + offs
        competing = (j >= lo) & (j < hi)
        keys = tl.load(key_row + j, mask=competing, other=-2147483648)
        undecided = competing & (keys >= first) & (keys <= last)
        positions = tl.cumsum(undecided.to(tl.int32), axis=0)
        tl.store(undecided_row + copied + positions - 1, keys, mask=undecided)
        copied += tl.max(positions, axis=0)


@triton.jit
def _share_stats(rows_ptr, full_blocks, stride_sh, N_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                 SHARES: tl.constexpr, SHARES_POW2: tl.constexpr):
    """The gauss rule's softmax statistics of each of the group's SHARES log-mass rows over the full blocks: the
    largest known (non-NaN) value (0 when none) and the sum of exp(value - largest); ``[SHARES_POW2]`` each. Both
    accumulate per slot over the chunks and reduce once."""
    g = tl.arange(0, SHARES_POW2)
    offs = tl.arange(0, CHUNK)
    tops = tl.full([SHARES_POW2, CHUNK], float("-inf"), tl.float32)
    for c in range(N_CHUNKS):
        tops = tl.maximum(tops, _log_masses(rows_ptr, g, c * CHUNK + offs, full_blocks, stride_sh, SHARES))
    tops = tl.max(tops, axis=1)
    tops = tl.where(tops > float("-inf"), tops, 0.0)
    sums = tl.zeros([SHARES_POW2, CHUNK], tl.float32)
    for c in range(N_CHUNKS):
        sums += tl.exp(_log_masses(rows_ptr, g, c * CHUNK + offs, full_blocks, stride_sh, SHARES) - tops[:, None])
    return tops, tl.sum(sums, axis=1)


@triton.jit
def _log_masses(rows_ptr, g, j, full_blocks, stride_sh, SHARES: tl.constexpr):
    """``[SHARES_POW2, CHUNK]`` log-masses of the group's rows at blocks j: -inf off the full blocks and for NaN."""
    rows = tl.load(rows_ptr + g[:, None] * stride_sh + j[None, :],
                   mask=(g < SHARES)[:, None] & (j < full_blocks)[None, :], other=float("-inf"))
    return tl.where(rows == rows, rows, float("-inf"))


@triton.jit
def _mass_shares(rows_ptr, j, full_blocks, tops, sums, stride_sh, SHARES: tl.constexpr, SHARES_POW2: tl.constexpr):
    """The gauss rule's second pass at blocks j: the sum over the group's rows of each row's softmax share (0 off
    the full blocks). A NaN log-mass (a block whose reprs hold NaN) has a NaN share, which ranks first as in the
    other rules."""
    g = tl.arange(0, SHARES_POW2)
    mask = (g < SHARES)[:, None] & (j < full_blocks)[None, :]
    rows = tl.load(rows_ptr + g[:, None] * stride_sh + j[None, :], mask=mask, other=float("-inf"))
    shares = tl.exp(tl.where(rows == rows, rows, float("-inf")) - tops[:, None]) / tl.maximum(sums, 1e-30)[:, None]
    return tl.sum(tl.where(mask & (rows != rows), float("nan"), shares), axis=0)


@triton.jit
def _write_keys(scores_ptr, key_row, lo, hi, full_blocks, stride_sh, N_CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                SHARES: tl.constexpr, SHARES_POW2: tl.constexpr):
    """The row's keys into its scratch (INT_MIN off the competing range [lo, hi), which no candidate reaches);
    returns the smallest and largest competing key (per slot over the chunks, reduced once) and the last chunk's
    keys as stored (the whole row when N_CHUNKS == 1: the search then counts from registers). Gauss (SHARES > 0):
    the keys of the group's summed shares."""
    offs = tl.arange(0, CHUNK)
    lowest = tl.full([CHUNK], 2147483647, tl.int32)
    highest = tl.full([CHUNK], -2147483648, tl.int32)
    keys = tl.full([CHUNK], -2147483648, tl.int32)
    if SHARES > 0:
        tops, sums = _share_stats(scores_ptr, full_blocks, stride_sh, N_CHUNKS, CHUNK, SHARES, SHARES_POW2)
    for c in range(N_CHUNKS):
        j = c * CHUNK + offs
        competing = (j >= lo) & (j < hi)
        if SHARES > 0:
            scores = _mass_shares(scores_ptr, j, full_blocks, tops, sums, stride_sh, SHARES, SHARES_POW2)
        else:
            scores = tl.load(scores_ptr + j, mask=competing, other=0.0)
        keys = _order_keys(scores)
        lowest = tl.minimum(lowest, tl.where(competing, keys, 2147483647))
        highest = tl.maximum(highest, tl.where(competing, keys, -2147483648))
        keys = tl.where(competing, keys, -2147483648)
        tl.store(key_row + j, keys)
    return tl.min(lowest, axis=0), tl.max(highest, axis=0), keys


@triton.jit(do_not_specialize=["max_blocks", "width"])
def _select_kernel(
    scores_ptr,  # [batch, num_kv_heads, max_blocks] fp32
    seq_lens_ptr,  # [batch]
    reselect_ptr,  # [batch] rows to select (read if MASKED; any pointer otherwise)
    sel_rows_ptr,  # [batch] int64 row of sel_idx / sel_count each request writes (read if SEL_ROWS)
    sel_idx_ptr,  # [batch or rows, num_kv_heads, width] int32
    sel_count_ptr,  # [batch or rows, num_kv_heads] int32
    keys_ptr,  # [batch, num_kv_heads, N_CHUNKS * CHUNK + FINISH] int32 scratch: the row's keys, then its undecided
    max_blocks, width, ratio_fixed, k_floor, init_window, local_window,
    stride_sb, stride_s_head, stride_sh,
    stride_kb, stride_kh,
    stride_ib, stride_ih, stride_ij,
    stride_cb, stride_ch,
    BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, SCAN: tl.constexpr, FINISH: tl.constexpr,
    MASKED: tl.constexpr,
    SEL_ROWS: tl.constexpr, SHARES: tl.constexpr, SHARES_POW2: tl.constexpr, PDL: tl.constexpr = 0,
):
    wait_for_previous_grid(PDL)
    head = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if MASKED:
        if tl.load(reselect_ptr + b) == 0:
            return
    out_b = _output_row(sel_rows_ptr, b, SEL_ROWS)
    seq_len, nb, count, lo, hi, need = _row_plan(seq_lens_ptr, b, max_blocks, ratio_fixed, k_floor, init_window,
                                                 local_window, BLOCK_SIZE)
    key_row = keys_ptr + b * stride_kb + head * stride_kh
    threshold = need * 0 + 2147483647
    ties_wanted = need * 0
    if need > 0:
        # the gauss rule: SHARES rows of log-masses per KV head (stride_s_head apart), one per query head of its
        # group, normalised over the full blocks (all of them while the request is sparse)
        lowest, highest, row_keys = _write_keys(scores_ptr + b * stride_sb + head * stride_s_head, key_row, lo, hi,
                                                tl.minimum(seq_len // BLOCK_SIZE, max_blocks), stride_sh, N_CHUNKS,
                                                CHUNK, SHARES, SHARES_POW2)
        tl.debug_barrier()  # every thread's keys are in the scratch before any thread counts them
        threshold, above = _kth_largest_key(key_row, row_keys, key_row + N_CHUNKS * CHUNK, lo, hi, lowest, highest,
                                             need, N_CHUNKS, CHUNK, SCAN, FINISH)
        ties_wanted = need - above  # ties go to the lowest logical indices
    sel_row = sel_idx_ptr + out_b * stride_ib + head * stride_ih
    offs = tl.arange(0, SCAN)
    taken = need * 0
    ties_seen = need * 0
    for c in range((N_CHUNKS * CHUNK + SCAN - 1) // SCAN):
        j = c * SCAN + offs
        competing = (j >= lo) & (j < hi)
        keys = tl.load(key_row + j, mask=competing & (need > 0), other=-2147483648)
        tie = competing & (keys == threshold)
        sure = (j < nb) & (~competing | (keys > threshold))
        # one scan for both running counts: ties in bits 16-30, sure picks in the low 16 (SCAN <= 2**14)
        counts = tl.cumsum((tie.to(tl.int32) << 16) | sure.to(tl.int32), axis=0)
        ties_taken = tl.minimum(ties_seen + (counts >> 16), ties_wanted) - tl.minimum(ties_seen, ties_wanted)
        take = sure | (tie & (ties_seen + (counts >> 16) <= ties_wanted))
        tl.store(sel_row + (taken + (counts & 0xFFFF) + ties_taken - 1) * stride_ij, j, mask=take)
        tl.store(sel_row + j * stride_ij, tl.full([SCAN], -1, tl.int32), mask=(j >= count) & (j < width))
        totals = tl.max(counts, axis=0)  # the last running counts: both halves only grow
        taken += (totals & 0xFFFF) + tl.minimum(ties_seen + (totals >> 16), ties_wanted) - tl.minimum(ties_seen,
                                                                                                      ties_wanted)
        ties_seen += totals >> 16
    tl.store(sel_count_ptr + out_b * stride_cb + head * stride_ch, count)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_scalars(block_size, sparse_ratio, init_window, local_window, min_blocks, score, token_budget) -> None:
    for name, value, least in (("block_size", block_size, 1), ("init_window", init_window, 0),
                               ("local_window", local_window, 0), ("min_blocks", min_blocks, 1)):
        if not _is_int(value) or value < least:
            raise ValueError(f"{name}: got {value!r}, expected an int >= {least}")
    if isinstance(sparse_ratio, bool) or not isinstance(sparse_ratio, (int, float)) or not 0 < sparse_ratio <= 1:
        raise ValueError(f"sparse_ratio: got {sparse_ratio!r}, expected a number in (0, 1]")
    if score not in SCORES:
        raise ValueError(f"score: got {score!r}, expected one of {SCORES}")
    if token_budget is not None and (not _is_int(token_budget) or token_budget < 1):
        raise ValueError(f"token_budget: got {token_budget!r}, expected None or an int >= 1")


def _check_reprs(q: torch.Tensor, reprs: dict) -> torch.Tensor:
    """Validate the reprs the score rule reads; return the first (its shape and strides stand for all)."""
    first_name, first = next(iter(reprs.items()))
    for name, repr_ in reprs.items():
        check_tensor(name, repr_, 3, REPR_DTYPES, q.device, "[num_blocks, num_kv_heads, head_dim]")
        if repr_.shape != first.shape or repr_.dtype != first.dtype or repr_.stride() != first.stride():
            raise ValueError(f"{name}: shape {tuple(repr_.shape)} dtype {repr_.dtype} strides {repr_.stride()} "
                             f"differ from {first_name}'s {tuple(first.shape)} {first.dtype} {first.stride()}")
    heads, head_dim = first.shape[1], first.shape[2]
    if head_dim != q.shape[2] or q.shape[1] % heads:
        raise ValueError(f"{first_name}: got [.., {heads}, {head_dim}], expected head_dim {q.shape[2]} (q's) and "
                         f"num_kv_heads dividing q's {q.shape[1]} query heads")
    return first


def _check_sel_rows(sel_rows, batch: int, out, device: torch.device) -> int:
    """Validate ``sel_rows`` (``[batch]`` int64); return how many rows ``out`` has."""
    check_tensor("sel_rows", sel_rows, 1, (torch.int64,), device, f"[batch={batch}]")
    if sel_rows.shape[0] != batch:
        raise ValueError(f"sel_rows: got shape {tuple(sel_rows.shape)}, expected [{batch}]")
    return out[0].shape[0] if isinstance(out[0], torch.Tensor) else batch


def _check_out(out, batch: int, heads: int, width: int, max_blocks: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    if out is None:
        return (padded_empty(batch, heads, width, dtype=torch.int32, device=device),
                torch.empty(batch, heads, dtype=torch.int32, device=device))
    sel_idx, sel_count = out
    check_tensor("out[0] (sel_idx)", sel_idx, 3, (torch.int32,), device, "[batch, num_kv_heads, width]")
    check_tensor("out[1] (sel_count)", sel_count, 2, (torch.int32,), device, "[batch, num_kv_heads]")
    if tuple(sel_idx.shape[:2]) != (batch, heads) or not width <= sel_idx.shape[2] <= max(width, max_blocks) \
            or tuple(sel_count.shape) != (batch, heads):
        raise ValueError(f"out: got sel_idx {tuple(sel_idx.shape)} and sel_count {tuple(sel_count.shape)}, expected "
                         f"[{batch}, {heads}, {width}..{max(width, max_blocks)}] and [{batch}, {heads}]")
    return sel_idx, sel_count


def selection_width(max_blocks: int, *, block_size: int, sparse_ratio: float, init_window: int, local_window: int,
                    min_blocks: int, token_budget: int | None = None) -> int:
    """Columns of ``sel_idx``: the most blocks any request could select with a ``max_blocks``-wide block table.

    A bound computed on the host from shapes only (no device sync, CUDA-graph friendly); it equals the
    largest count in the batch when the longest request fills its block table.
    """
    return min(max_blocks, max(_wanted(max_blocks, block_size, sparse_ratio, token_budget), min_blocks,
                               init_window + max(local_window, 1)))


def selection_counts(num_blocks: torch.Tensor, *, block_size: int, sparse_ratio: float, init_window: int,
                     local_window: int, min_blocks: int, token_budget: int | None = None) -> torch.Tensor:
    """:func:`selection_width` of each request, on the device (no host sync, CUDA-graph friendly): int64 ``[batch]``
    blocks selected for ``num_blocks`` (integer ``[batch]``, logical blocks per request)."""
    limits = _plan_args(0, block_size, sparse_ratio, init_window, local_window, min_blocks, token_budget)
    blocks = num_blocks.long()
    wanted = (blocks * limits["ratio_fixed"] + (RATIO_ONE - 1)) >> 32
    return torch.minimum(blocks, wanted.clamp(min=limits["k_floor"]))


def _wanted(num_blocks: int, block_size: int, sparse_ratio: float, token_budget: int | None) -> int:
    """ceil(token_budget / block_size), or ceil(sparse_ratio * num_blocks) in the kernels' fixed point."""
    if token_budget is not None:
        return -(-token_budget // block_size)
    return -(-int(sparse_ratio * RATIO_ONE) * num_blocks // RATIO_ONE)


def _plan_args(max_blocks, block_size, sparse_ratio, init_window, local_window, min_blocks, token_budget) -> dict:
    """The kernels' k rule, ``k = max(k_floor, ceil(ratio_fixed * nb / 2**32))``, and the windows."""
    local_window = max(local_window, 1)
    k_floor = max(min_blocks, init_window + local_window)
    if token_budget is None:
        ratio_fixed = int(sparse_ratio * RATIO_ONE)
    else:
        ratio_fixed, k_floor = 0, max(k_floor, _wanted(0, block_size, sparse_ratio, token_budget))
    return dict(max_blocks=max_blocks, ratio_fixed=ratio_fixed, k_floor=k_floor, init_window=init_window,
                local_window=local_window)



def _choose_score_launch(heads: int, head_dim: int) -> tuple[int, int]:
    """(TILE blocks, num_warps) of the score kernel: about 8K repr elements per repr per program, 4 warps.

    Swept on the H100 at 8 x 8K blocks (8 heads x 128; CUDA graph): tiles of 2 to 16 blocks with 2 or 4 warps
    were all within 2% (whole Quest selection 0.133-0.135 ms); 8 warps on small tiles and 2 warps on tiles of
    16+ blocks were up to 10x slower.
    """
    tile = max(1, min(64, 8192 // (next_pow2(heads) * next_pow2(head_dim))))
    return tile, 4


def _choose_select_launch(max_blocks: int) -> tuple[int, int]:
    """(CHUNK row entries per step of a pass, num_warps) of the top-k program: chunks of up to _SELECT_CHUNK
    entries, 4 a thread (one 16-byte load), 1 to 8 warps."""
    chunk = min(_SELECT_CHUNK, next_pow2(max(max_blocks, 1)))
    return chunk, min(8, max(1, chunk // 128))


@dataclass(frozen=True)
class SelectPlan:
    """What :func:`select_blocks` derives from shapes and settings, made once by :func:`plan_select`.

    ``plan.run(q, kmin, kmax, kmean, block_table, seq_lens, out=...)`` then costs input checks and two launches
    per layer (no scalar checks, no scratch allocation; CUDA-graph friendly). ``scores`` is scratch every run
    overwrites, so runs sharing a plan must run in one stream order (as the layers of a step do).
    """
    batch: int
    num_kv_heads: int
    head_dim: int
    max_blocks: int  # block_table.shape[1]
    width: int  # sel_idx columns, :func:`selection_width`
    block_size: int
    rule: int  # score rule, its index in SCORES: Quest and gauss read kmin / kmax, mean kmean
    group: int  # query heads per KV head (the gauss rule scores each; 1 for the others)
    limits: dict  # the kernels' k rule and windows (max_blocks, ratio_fixed, k_floor, init_window, local_window)
    scores: torch.Tensor  # [batch, num_kv_heads * group, max_blocks] fp32 scratch
    keys: torch.Tensor  # [batch, num_kv_heads, select_chunk * n + select_finish] int32 top-k scratch (0 if sliced)
    score_tile: int
    score_warps: int
    select_chunk: int
    select_warps: int
    select_finish: int  # most undecided keys the top-k's search finishes from registers (<= select_chunk)
    slices: int = 0  # programs a row of the sliced top-k (``sliced.py``), 0 for one program a row
    slice_blocks: int = 0  # blocks a slice program holds (``sliced.SLICE`` when planned)
    candidates: torch.Tensor | None = None  # [batch, num_kv_heads, slices, 2, keep] int32: a slice's keys, blocks
    candidate_counts: torch.Tensor | None = None  # [batch, num_kv_heads, slices] int32
    arrivals: torch.Tensor | None = None  # [batch, num_kv_heads] int32, zero between launches (sliced.py)
    radix_slice: int = 0  # blocks a slice program of the radix top-k writes (``radix.py``), 0 for another path

    def for_rows(self, rows: int) -> "SelectPlan":
        """This plan for the first ``rows`` (<= batch) requests, sharing its scratch (e.g. the plan of a smaller
        batch captured in its own CUDA graph)."""
        if not _is_int(rows) or not 0 <= rows <= self.batch:
            raise ValueError(f"rows: got {rows!r}, expected an int in [0, {self.batch}]")
        sliced = {} if not self.slices else dict(candidates=self.candidates[:rows],
                                                  candidate_counts=self.candidate_counts[:rows],
                                                  arrivals=self.arrivals[:rows])
        return dataclasses.replace(self, batch=rows, scores=self.scores[:rows], keys=self.keys[:rows], **sliced)

    def run(self, q: torch.Tensor, kmin: torch.Tensor | None, kmax: torch.Tensor | None, kmean: torch.Tensor | None,
            block_table: torch.Tensor, seq_lens: torch.Tensor, *, kscale: torch.Tensor | None = None,
            out: tuple[torch.Tensor, torch.Tensor] | None = None, reselect: torch.Tensor | None = None,
            sel_rows: torch.Tensor | None = None, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`select_blocks` with this plan's settings: same tensor arguments, ``kscale``, ``out``,
        ``reselect``, ``sel_rows``, ``scale`` and result."""
        reprs, kscale = _check_inputs(q, kmin, kmax, kmean, block_table, seq_lens, self.rule != MEAN.value, kscale,
                                      reselect)
        shapes = (q.shape[0], reprs.shape[1], q.shape[2], block_table.shape[1])
        planned = (self.batch, self.num_kv_heads, self.head_dim, self.max_blocks)
        if shapes != planned:
            raise ValueError(f"plan was made for (batch, num_kv_heads, head_dim, max_blocks) = {planned}; "
                             f"the inputs have {shapes}")
        if self.rule == GAUSS.value and q.shape[1] != self.num_kv_heads * self.group:
            raise ValueError(f"q: {q.shape[1]} query heads, the plan was made for num_q_heads = "
                             f"{self.num_kv_heads * self.group}")
        check_device("plan.scores", self.scores, q.device)
        return _launch(self, q, reprs, kmax, kscale, block_table, seq_lens, out, reselect, sel_rows, scale)


def plan_select(batch: int, num_kv_heads: int, head_dim: int, max_blocks: int, *, block_size: int, sparse_ratio: float,
                init_window: int, local_window: int, min_blocks: int, score: str = "quest",
                token_budget: int | None = None, device: torch.device | str = "cuda", num_q_heads: int | None = None
                ) -> SelectPlan:
    """Check the selection settings once and allocate the score scratch for ``[batch, max_blocks]`` block tables.

    Arguments as in :func:`select_blocks`; ``num_kv_heads`` and ``head_dim`` are the reprs', ``max_blocks`` the
    block table's width and ``device`` the tensors'; ``num_q_heads`` (q's heads) is required by the gauss rule,
    which scores each query head. Returns a :class:`SelectPlan`; run it once per layer.
    """
    _check_scalars(block_size, sparse_ratio, init_window, local_window, min_blocks, score, token_budget)
    if score == "gauss" and (not _is_int(num_q_heads) or num_q_heads < 1 or num_q_heads % max(num_kv_heads, 1)):
        raise ValueError(f"num_q_heads: got {num_q_heads!r}, the gauss rule needs q's head count, a multiple of "
                         f"num_kv_heads={num_kv_heads}")
    for name, value, least in (("batch", batch, 0), ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1),
                               ("max_blocks", max_blocks, 0)):
        if not _is_int(value) or value < least:
            raise ValueError(f"{name}: got {value!r}, expected an int >= {least}")
    if max_blocks > MAX_TABLE_BLOCKS:
        raise ValueError(f"max_blocks: got {max_blocks}, at most {MAX_TABLE_BLOCKS} block table columns are supported")
    return _make_plan(batch, num_kv_heads, head_dim, max_blocks, torch.device(device), block_size, sparse_ratio,
                      init_window, local_window, min_blocks, score, token_budget, num_q_heads)


def _make_plan(batch, heads, head_dim, max_blocks, device, block_size, sparse_ratio, init_window, local_window,
               min_blocks, score, token_budget, num_q_heads=None, scores: torch.Tensor | None = None) -> SelectPlan:
    width = selection_width(max_blocks, block_size=block_size, sparse_ratio=sparse_ratio, init_window=init_window,
                            local_window=local_window, min_blocks=min_blocks, token_budget=token_budget)
    limits = _plan_args(max_blocks, block_size, sparse_ratio, init_window, local_window, min_blocks, token_budget)
    group = num_q_heads // heads if score == "gauss" else 1
    if scores is None:  # the score scratch, unless the caller brings the scores
        scores = padded_empty(batch, heads * group, max_blocks, dtype=torch.float32, device=device)
    chunk, select_warps = _choose_select_launch(max_blocks)
    finish = min(chunk, _SELECT_FINISH)
    multi_program = _multi_program_top_k(batch, heads, max_blocks, width, device, score)
    key_entries = 0 if multi_program else cdiv(max(max_blocks, 1), chunk) * chunk + finish
    keys = torch.empty(batch, heads, key_entries, dtype=torch.int32, device=device)
    return SelectPlan(batch, heads, head_dim, max_blocks, width, block_size, SCORES.index(score), group, limits, scores,
                      keys, *_choose_score_launch(heads, head_dim), chunk, select_warps, finish, **multi_program)


def _multi_program_top_k(batch, heads, max_blocks, width, device, score) -> dict:
    """SelectPlan's fields of a top-k over several programs a row: the sliced one's (its count and scratch) where
    ``choose_slicing`` plans it, else the radix one's slice where ``choose_radix`` does; {} for one program a row."""
    slices = sliced_top_k.choose_slicing(max_blocks, width, batch * heads, sm_count(device), score != "gauss")
    if slices:
        keep = next_pow2(width)
        return dict(slices=slices, slice_blocks=sliced_top_k.SLICE,
                    candidates=torch.empty(batch, heads, slices, 2, keep, dtype=torch.int32, device=device),
                    candidate_counts=torch.empty(batch, heads, slices, dtype=torch.int32, device=device),
                    arrivals=torch.zeros(batch, heads, dtype=torch.int32, device=device))
    radix_slice = radix_top_k.choose_radix(max_blocks, batch * heads, sm_count(device), score != "gauss")
    return dict(radix_slice=radix_slice) if radix_slice else {}


def select_blocks(q: torch.Tensor, kmin: torch.Tensor | None, kmax: torch.Tensor | None,
                  kmean: torch.Tensor | None, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                  block_size: int, sparse_ratio: float, init_window: int, local_window: int, min_blocks: int,
                  score: str = "quest", token_budget: int | None = None, kscale: torch.Tensor | None = None,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None, reselect: torch.Tensor | None = None,
                  sel_rows: torch.Tensor | None = None, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the KV blocks each (request, KV head) attends this decode step.

    Per request, ``nb = ceil(seq_len / block_size)`` logical blocks and ``k = max(min_blocks, wanted,
    init_window + max(local_window, 1))`` with ``wanted = ceil(sparse_ratio * nb)`` (sparse_ratio rounded down
    to a multiple of 2**-32, so 0.1 of 10 blocks is 1) or, with ``token_budget``, ``ceil(token_budget /
    block_size)``. If ``k >= nb`` all nb blocks are selected (dense). Otherwise the first ``init_window`` and
    the last ``max(local_window, 1)`` blocks (the block holding the current token is always attended) plus the
    top-scoring rest of the full blocks in between, ``k`` in all; ties go to the lower logical index.
    Every layer of a step shares the settings and shapes: :func:`plan_select` once, then ``plan.run`` per layer
    skips the per-call planning this function does.

    Args:
        q: ``[batch, num_q_heads, head_dim]`` bf16/fp16/fp32; query head i belongs to KV head
            ``i // (num_q_heads // num_kv_heads)``. The group's per-head scores are summed.
        kmin, kmax, kmean: ``[num_blocks, num_kv_heads, head_dim]`` bf16/fp16/fp32/float8_e4m3fn reprs by
            physical block id (see ``ucm_kernels.block_repr``); Quest reads kmin and kmax (one dtype), the mean
            rule kmean (the other may be None). Every full block that competes must have its repr computed.
        block_table: ``[batch, max_blocks]`` int32/int64 logical -> physical block id.
        seq_lens: ``[batch]`` int32/int64 tokens per request including the current one (0: nothing selected;
            lengths beyond the table are clamped to ``max_blocks`` blocks).
        score: ``"quest"`` (upper bound ``sum_d max(q_d kmin_d, q_d kmax_d)``), ``"mean"`` (``q . kmean``) or
            ``"gauss"`` (reads kmin / kmax: each query head's log attention mass on a block estimated as if its
            keys spread uniformly over the box, ``scale q.c + scale**2 / 6 * sum_d q_d**2 r_d**2`` with centre c
            and half-width r; a softmax over the request's full blocks makes these the head's shares of its
            attention, and the group's shares are added: two passes, the second in the top-k program).
        kscale: ``[num_blocks, num_kv_heads]`` fp32, any strides: the per-(block, KV head) scales of fp8 reprs
            (a repr's value is ``repr.float() * kscale[..., None]``); required when the reprs the rule reads are
            fp8, not read otherwise.
        out: optional ``(sel_idx, sel_count)`` to write into, shaped as returned (sel_idx may be up to
            max_blocks wide; the extra columns are padded too).
        reselect: optional ``[batch]`` int32/bool: only the rows where it is nonzero are selected; the others'
            rows of ``out`` (required then) are left as they are, e.g. holding an earlier step's selection, and
            their blocks are not scored (selection reuse, ``GSAConfig.select_every``).
        sel_rows: optional ``[batch]`` int64: request b's lists go to row ``sel_rows[b]`` of ``out`` (required
            then, any number of rows), e.g. its slot of lists kept across steps; distinct valid rows (not
            checked: no host sync).
        scale: the softmax scale the gauss rule estimates with (default ``head_dim ** -0.5``; unused otherwise).
    Returns:
        ``sel_idx [batch, num_kv_heads, width]`` int32 logical block indices, ascending, padded with -1, where
        ``width = selection_width(max_blocks, ...)``; ``sel_count [batch, num_kv_heads]`` int32.
    """
    _check_scalars(block_size, sparse_ratio, init_window, local_window, min_blocks, score, token_budget)
    reprs, kscale = _check_inputs(q, kmin, kmax, kmean, block_table, seq_lens, score != "mean", kscale, reselect)
    plan = _make_plan(q.shape[0], reprs.shape[1], q.shape[2], block_table.shape[1], q.device, block_size,
                      sparse_ratio, init_window, local_window, min_blocks, score, token_budget, q.shape[1])
    return _launch(plan, q, reprs, kmax, kscale, block_table, seq_lens, out, reselect, sel_rows, scale)


def select_from_scores(scores: torch.Tensor, seq_lens: torch.Tensor, *, block_size: int, sparse_ratio: float,
                       init_window: int, local_window: int, min_blocks: int, token_budget: int | None = None,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None, reselect: torch.Tensor | None = None,
                       sel_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_blocks`' lists from scores given per logical block instead of computed from reprs.

    Args:
        scores: fp32 ``[batch, num_kv_heads, max_blocks]``, last dim contiguous: the score of each logical block
            (-inf: never picked while enough blocks score more; the windows are taken whatever they score).
        seq_lens, block_size, sparse_ratio, init_window, local_window, min_blocks, token_budget, out, reselect,
            sel_rows: as in :func:`select_blocks`.
    Returns:
        ``(sel_idx, sel_count)`` as :func:`select_blocks` returns them (same count rule, windows, tie rule).
    """
    _check_scalars(block_size, sparse_ratio, init_window, local_window, min_blocks, "quest", token_budget)
    check_tensor("scores", scores, 3, (torch.float32,), scores.device, "[batch, num_kv_heads, max_blocks]")
    batch, heads, max_blocks = scores.shape
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, scores.device, f"[batch={batch}]")
    if seq_lens.shape[0] != batch or scores.stride(2) != 1 or max_blocks > MAX_TABLE_BLOCKS:
        raise ValueError(f"scores {tuple(scores.shape)} strides {scores.stride()} / seq_lens "
                         f"{tuple(seq_lens.shape)}: expected {batch} rows, a contiguous last dim and at most "
                         f"{MAX_TABLE_BLOCKS} blocks")
    if reselect is not None:
        check_tensor("reselect", reselect, 1, (torch.int32, torch.bool), scores.device, f"[batch={batch}]")
    for name, given in (("reselect", reselect), ("sel_rows", sel_rows)):
        if given is not None and out is None:
            raise ValueError(f"{name}: given without out; the lists go into rows of out that outlive the call")
    plan = _make_plan(batch, heads, 1, max_blocks, scores.device, block_size, sparse_ratio, init_window,
                      local_window, min_blocks, "quest", token_budget, scores=scores)
    out_rows = batch if sel_rows is None else _check_sel_rows(sel_rows, batch, out, scores.device)
    sel_idx, sel_count = _check_out(out, out_rows, heads, plan.width, max_blocks, scores.device)
    if batch and max_blocks:
        _launch_select(plan, scores, seq_lens, sel_idx, sel_count, reselect, sel_rows)
    elif out is None:
        sel_count.zero_()
    return sel_idx, sel_count


def _check_kscale(kscale, reprs: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The scales the score kernel reads: kscale for fp8 reprs (validated), None for the others."""
    if reprs.dtype != FP8:
        return None
    if kscale is None:
        raise ValueError(f"kscale: got None, expected the [num_blocks, num_kv_heads] fp32 scales of the {FP8} reprs "
                         "(empty_block_repr allocates them beside the reprs)")
    layout = f"[num_blocks={reprs.shape[0]}, num_kv_heads={reprs.shape[1]}]"
    check_tensor("kscale", kscale, 2, (torch.float32,), device, layout)
    if kscale.shape != reprs.shape[:2]:
        raise ValueError(f"kscale: got shape {tuple(kscale.shape)}, expected {layout} like the reprs")
    return kscale


def _check_inputs(q, kmin, kmax, kmean, block_table, seq_lens, box: bool, kscale, reselect=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the tensors (``box``: the rule reads kmin / kmax, else kmean); return the first repr the score rule
    reads (its shape and strides stand for all) and the scales to apply (None unless the reprs are fp8)."""
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q: got {q!r}, expected a [batch, num_q_heads, head_dim] tensor")
    check_tensor("q", q, 3, Q_DTYPES, q.device, "[batch, num_q_heads, head_dim]")
    if not q.is_cuda and not triton_interpreting():
        raise ValueError(f"q is on {q.device}: the kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    reprs = _check_reprs(q, {"kmin": kmin, "kmax": kmax} if box else {"kmean": kmean})
    batch = q.shape[0]
    check_tensor("block_table", block_table, 2, INDEX_DTYPES, q.device, f"[batch={batch}, max_blocks]")
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, q.device, f"[batch={batch}]")
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(f"block_table {tuple(block_table.shape)} / seq_lens {tuple(seq_lens.shape)}: expected "
                         f"{batch} rows, q's batch")
    if block_table.shape[1] > MAX_TABLE_BLOCKS:
        raise ValueError(f"block_table: {block_table.shape[1]} columns, at most {MAX_TABLE_BLOCKS} are supported")
    if reselect is not None:
        check_tensor("reselect", reselect, 1, (torch.int32, torch.bool), q.device, f"[batch={batch}]")
        if reselect.shape[0] != batch or reselect.stride(0) != 1:
            raise ValueError(f"reselect: got shape {tuple(reselect.shape)} strides {reselect.stride()}, expected a "
                             f"contiguous [{batch}]")
    return reprs, _check_kscale(kscale, reprs, q.device)


_SCORE, _SELECT = Launcher(_score_kernel), Launcher(_select_kernel)


def _launch(plan: SelectPlan, q, reprs, kmax, kscale, block_table, seq_lens, out, reselect, sel_rows=None,
            scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score the competing blocks into ``plan.scores`` (times ``kscale`` unless None), then pick each row's blocks
    into ``out`` (only the rows ``reselect`` names, unless None; at the rows ``sel_rows`` names, if given)."""
    for name, given in (("reselect", reselect), ("sel_rows", sel_rows)):
        if given is not None and out is None:
            raise ValueError(f"{name}: given without out; the lists go into rows of out that outlive the call, "
                             "so pass out")
    out_rows = plan.batch if sel_rows is None else _check_sel_rows(sel_rows, plan.batch, out, q.device)
    sel_idx, sel_count = _check_out(out, out_rows, plan.num_kv_heads, plan.width, plan.max_blocks, q.device)
    if sel_rows is not None and plan.batch and plan.max_blocks == 0:
        raise ValueError("sel_rows: not supported with an empty block table")
    if plan.batch == 0 or plan.max_blocks == 0:
        if sel_rows is not None:  # no request
            return sel_idx, sel_count
        rows = torch.ones(plan.batch, dtype=torch.bool, device=q.device) if reselect is None else reselect.bool()
        sel_idx.masked_fill_(rows[:, None, None], -1)
        sel_count.masked_fill_(rows[:, None], 0)
        return sel_idx, sel_count
    scores = plan.scores
    group = q.shape[1] // plan.num_kv_heads
    # each tensor's strides read once: every stride(i) is a call into torch (~0.25 us, host time per layer)
    q_strides, repr_strides, table_strides = q.stride(), reprs.stride(), block_table.stride()
    score_strides = scores.stride()
    scale_strides = (0, 0) if kscale is None else kscale.stride()
    _SCORE((cdiv(plan.max_blocks, plan.score_tile), plan.batch),
        q_ptr=q, kmin_ptr=reprs, kmax_ptr=reprs if plan.rule == MEAN.value else kmax, kmean_ptr=reprs,
        kscale_ptr=scores if kscale is None else kscale, block_table_ptr=block_table, seq_lens_ptr=seq_lens,
        reselect_ptr=seq_lens if reselect is None else reselect, scores_ptr=scores, **plan.limits,
        sm_scale=plan.head_dim ** -0.5 if scale is None else float(scale),
        stride_qb=q_strides[0], stride_qh=q_strides[1], stride_qd=q_strides[2],
        stride_rb=repr_strides[0], stride_rh=repr_strides[1], stride_rd=repr_strides[2],
        stride_kscale_b=scale_strides[0], stride_kscale_h=scale_strides[1],
        stride_tb=table_strides[0], stride_tj=table_strides[1],
        stride_sb=score_strides[0], stride_sh=score_strides[1],
        BLOCK_SIZE=plan.block_size, HEADS=plan.num_kv_heads, HEADS_PAD=next_pow2(plan.num_kv_heads), GROUP=group,
        BLOCK_G=next_pow2(group), HEAD_DIM=plan.head_dim, BLOCK_D=next_pow2(plan.head_dim), RULE=plan.rule,
        TILE=plan.score_tile, SCALED=kscale is not None, MASKED=reselect is not None, num_warps=plan.score_warps,
    )
    _launch_select(plan, scores, seq_lens, sel_idx, sel_count, reselect, sel_rows)
    return sel_idx, sel_count


def _launch_select(plan: SelectPlan, scores, seq_lens, sel_idx, sel_count, reselect, sel_rows) -> None:
    """The top-k launch: each (KV head, request) row of ``scores`` (``[batch, heads, >= max_blocks]``) into
    ``sel_idx`` / ``sel_count`` (only the rows ``reselect`` names, unless None; at the rows ``sel_rows`` names)."""
    if plan.slices:
        sliced_top_k.launch_sliced(plan, scores, seq_lens, sel_idx, sel_count, reselect, sel_rows)
        return
    if plan.radix_slice:
        radix_top_k.launch_radix(plan, scores, seq_lens, sel_idx, sel_count, reselect, sel_rows)
        return
    shares = plan.group if plan.rule == GAUSS.value else 0
    n_chunks = (plan.keys.shape[2] - plan.select_finish) // plan.select_chunk
    scan = plan.select_chunk * min(_SCAN_CHUNKS, next_pow2(n_chunks))
    assert scan <= 1 << 14, f"top-k scan of {scan} entries: its packed counts hold at most 2**14"
    score_strides, key_strides = scores.stride(), plan.keys.stride()
    idx_strides, count_strides = sel_idx.stride(), sel_count.stride()
    _SELECT((plan.num_kv_heads, plan.batch),
        scores_ptr=scores, seq_lens_ptr=seq_lens, reselect_ptr=seq_lens if reselect is None else reselect,
        sel_rows_ptr=seq_lens if sel_rows is None else sel_rows, sel_idx_ptr=sel_idx, sel_count_ptr=sel_count,
        keys_ptr=plan.keys, width=sel_idx.shape[2], **plan.limits,
        stride_sb=score_strides[0], stride_s_head=score_strides[1] * max(shares, 1), stride_sh=score_strides[1],
        stride_kb=key_strides[0], stride_kh=key_strides[1],
        stride_ib=idx_strides[0], stride_ih=idx_strides[1], stride_ij=idx_strides[2],
        stride_cb=count_strides[0], stride_ch=count_strides[1],
        BLOCK_SIZE=plan.block_size, CHUNK=plan.select_chunk, N_CHUNKS=n_chunks,
        SCAN=scan, FINISH=plan.select_finish,
        MASKED=reselect is not None, SEL_ROWS=sel_rows is not None, SHARES=shares,
        SHARES_POW2=next_pow2(max(shares, 1)), num_warps=plan.select_warps,
    )
