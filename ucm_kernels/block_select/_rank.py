"""Order statistics shared by the top-k kernels (``triton.py``'s one program a row, ``sliced.py``'s programs a
slice and their merge, ``radix.py``'s programs a slice): the k rule and windows of a row, scores as
order-preserving int32 keys, and the bitwise search for the k-th largest key.

Keys are searched in offset binary (key + 2**31, int64): ``found`` holds the bits of the answer set so far, ``bit``
the next bit to decide (-1 when done) and ``above`` how many keys lie past the still undecided range
``[found, found + 2**(bit + 1))``.
"""
import triton
import triton.language as tl

KEY_NONE = tl.constexpr(-2147483648)  # the key of no block: below every score's key (NaN maps to the top)


@triton.jit
def _plan(seq_len, max_blocks, ratio_fixed, k_floor, init_window, local_window, BLOCK_SIZE: tl.constexpr):
    """(nb, count, lo, hi): logical blocks, blocks selected, and the range [lo, hi) that competes (empty if dense)."""
    nb = tl.minimum(tl.cdiv(seq_len, BLOCK_SIZE), max_blocks)
    wanted = ((nb.to(tl.int64) * ratio_fixed + 0xFFFFFFFF) >> 32).to(tl.int32)
    k = tl.maximum(wanted, k_floor)
    dense = k >= nb
    count = tl.where(dense, nb, k)
    lo = tl.where(dense, nb, init_window)
    hi = tl.where(dense, nb, nb - local_window)
    return nb, count, lo, hi


@triton.jit
def _row_plan(seq_lens_ptr, b, max_blocks, ratio_fixed, k_floor, init_window, local_window,
              BLOCK_SIZE: tl.constexpr):
    """(seq_len, nb, count, lo, hi, need) of request b: :func:`_plan`'s, and how many blocks are picked among the
    competing ones (the windows take the rest of ``count``)."""
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    nb, count, lo, hi = _plan(seq_len, max_blocks, ratio_fixed, k_floor, init_window, local_window, BLOCK_SIZE)
    return seq_len, nb, count, lo, hi, count - (nb - (hi - lo))


@triton.jit
def _output_row(sel_rows_ptr, b, SEL_ROWS: tl.constexpr):
    """The row of sel_idx / sel_count request b writes: ``sel_rows[b]`` if SEL_ROWS, else b."""
    out_b = b
    if SEL_ROWS:
        out_b = tl.load(sel_rows_ptr + b).to(tl.int64)
    return out_b


@triton.jit
def _order_keys(scores):
    """int32 keys in the order of the fp32 scores, every NaN (either sign) above +inf: NaN ranks first."""
    bits = tl.where(scores == scores, scores, float("nan")).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _common_prefix(lowest, highest):
    """(found, bit): the bits (offset binary, int64) that every key in [lowest, highest] shares, from the top down
    to the highest one where lowest and highest differ, which is ``bit`` (-1 when they are equal)."""
    low = lowest.to(tl.int64) + 2147483648
    high = highest.to(tl.int64) + 2147483648
    found = low * 0
    bit = found + 31
    while (bit >= 0) & (((low ^ high) >> tl.maximum(bit, 0)) == 0):
        found = found | (low & (1 << bit))
        bit -= 1
    return found, bit


@triton.jit
def _finish_search(keys, found, above, bit, k, RADIX_BITS: tl.constexpr):
    """(found, above) with every bit decided: the k-th largest of ``keys`` (registers, ``KEY_NONE`` for none) in
    offset binary, and how many keys are larger. RADIX_BITS bits a round: ``2**RADIX_BITS - 1`` counts of the
    keys in the undecided range, one reduction."""
    digits = tl.arange(0, 1 << RADIX_BITS)
    while bit >= 0:
        width = tl.minimum(bit + 1, RADIX_BITS)
        low_bit = bit + 1 - width
        candidates = (found + (digits.to(tl.int64) << low_bit) - 2147483648).to(tl.int32)
        last = (found + (1 << (bit + 1)) - 1 - 2147483648).to(tl.int32)  # the undecided range's end
        counts = above + tl.sum(((keys[:, None] >= candidates[None, :]) & (keys <= last)[:, None]).to(tl.int32),
                                axis=0)
        digit = tl.max(tl.where((digits >= 1) & (digits < (1 << width)) & (counts >= k), digits, 0), axis=0)
        next_count = tl.sum(tl.where(digits == digit + 1, counts, 0), axis=0)
        above = tl.where(digit + 1 < (1 << width), next_count, above)
        found = found + (digit.to(tl.int64) << low_bit)
        bit = low_bit - 1
    return found, above


@triton.jit
def _write_windows(sel_row, p, lo, hi, picked, count, width, stride_ij):
    """The list entries at positions ``p`` outside the ``picked`` picks at [lo, lo + picked): the init window
    (``p < lo``: block p), the local window after the picks (blocks from ``hi``; the whole list when dense), -1 from
    ``count`` to ``width``."""
    value = tl.where(p < lo, p, hi + (p - lo - picked))
    value = tl.where(p < count, value, -1)
    tl.store(sel_row + p * stride_ij, value, mask=(p < width) & ((p < lo) | (p >= lo + picked)))
