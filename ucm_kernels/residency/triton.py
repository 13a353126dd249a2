"""Triton residency bookkeeping (four launches, no host sync) and the indexed row copy.

``admit``, four launches over the pool's slots and the wanted entries: (1) probe the wanted pieces (hits stamped,
misses ranked through an atomic counter: each program's misses get consecutive ranks); (2) each program histograms
the eviction ages of a tile of slots, and the program that finishes last (an acquire-release counter) finds the
victim age and, per tile, how many victims the tiles before it hold; (3) each program ranks its tile's victims,
older ones first, then those of the victim age, each group in slot order; (2) and (3) do nothing when nothing
misses; (4) the k-th miss takes the k-th victim, the maps are updated, and (``admit_selection`` with ``rows``)
each program copies the rows of the misses it admitted. Miss ranks follow program order, so on a GPU which victim a
miss takes varies between runs (the set of victims does not); in the interpreter programs run in order and the
result equals ``torch.admit``'s. Every kernel here takes programmatic dependent launch (``ucm_kernels._launch``):
it waits for the kernel before it first thing.
"""
import torch
import triton
import triton.language as tl

from ucm_kernels._launch import Launcher, wait_for_previous_grid
from ucm_kernels._utils import alignment, cdiv, check_device, check_tensor, evenly_strided_rows, next_pow2, padded_empty

from .torch import AGE_CAP

# counter slots (constexpr: the kernels read them as globals); FINISHED counts the histogram launch's finished
# programs, OLDEST is the victim age
MISSES, OLDER, ADMITTED, TIES, FINISHED, OLDEST = (tl.constexpr(slot) for slot in range(6))
_TILE = 1024
_SLOT_TILE = 4096  # slots per program of the victim search
_PREFIX_ROWS = 16  # tiles' histograms per step of the victim age search
_BINS = next_pow2(AGE_CAP + 1)  # age bins
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@triton.jit(do_not_specialize=["n", "stamp_value", "width", "sel_stride", "table_stride", "heads", "probe_programs"])
def _probe_kernel(pieces, wanted, sel_idx, sel_count, block_table, slot_of, stamp, slots, miss_rank, counters, tally,
                  kv, pinned, token_pieces, token_offsets, key, value, token_slots, n, stamp_value, width,
                  sel_stride, table_stride, heads, probe_programs, FROM_SELECTION: tl.constexpr,
                  HAS_TALLY: tl.constexpr, WRITE_TOKENS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DIM_POW2: tl.constexpr, TILE: tl.constexpr, PDL: tl.constexpr = 0):
    """Programs below ``probe_programs`` probe a tile of entries each; with WRITE_TOKENS, each program above writes
    one decode token (as ``_write_tokens_kernel``): the two touch different state (a token's slot is resident)."""
    wait_for_previous_grid(PDL)
    pid = tl.program_id(0)
    if pid < probe_programs:
        _probe_tile(pieces, wanted, sel_idx, sel_count, block_table, slot_of, stamp, slots, miss_rank, counters,
                    tally, pid, n, stamp_value, width, sel_stride, table_stride, heads, FROM_SELECTION, HAS_TALLY,
                    TILE)
    elif WRITE_TOKENS:
        _write_token_row(kv, slot_of, stamp, pinned, token_pieces, token_offsets, key, value, token_slots,
                         pid - probe_programs, stamp_value, BLOCK_SIZE, HEAD_DIM, DIM_POW2)


@triton.jit
def _probe_tile(pieces, wanted, sel_idx, sel_count, block_table, slot_of, stamp, slots, miss_rank, counters, tally,
                pid, n, stamp_value, width, sel_stride, table_stride, heads, FROM_SELECTION: tl.constexpr,
                HAS_TALLY: tl.constexpr, TILE: tl.constexpr):
    offs = pid * TILE + tl.arange(0, TILE)
    inside = offs < n
    if FROM_SELECTION:  # entry = (row, j): row = request * heads + head; pieces is written, -1 where unlisted
        row, j = offs // width, offs % width  # sel_idx rows sel_stride apart
        logical = tl.load(sel_idx + row * sel_stride + j, mask=inside, other=-1)
        want = inside & (j < tl.load(sel_count + row, mask=inside, other=0)) & (logical >= 0)
        host = tl.load(block_table + (row // heads) * table_stride + logical, mask=want, other=0).to(tl.int64)
        piece = tl.where(want, host * heads + row % heads, -1)
        tl.store(pieces + offs, piece, mask=inside)
    else:
        want = tl.load(wanted + offs, mask=inside, other=0) != 0
        piece = tl.load(pieces + offs, mask=want, other=0)
    slot = tl.load(slot_of + piece, mask=want, other=-1)
    hit = want & (slot >= 0)
    tl.store(stamp + slot, tl.full([TILE], stamp_value, tl.int64), mask=hit)
    miss = (want & (slot < 0)).to(tl.int32)
    base = tl.atomic_add(counters + MISSES, tl.sum(miss, 0))
    rank = base + tl.cumsum(miss, 0) - 1
    tl.store(slots + offs, tl.where(hit, slot, -1), mask=inside)
    tl.store(miss_rank + offs, tl.where(miss != 0, rank, -1), mask=inside)
    if HAS_TALLY:
        tl.atomic_add(tally, tl.sum(want.to(tl.int64), 0))


@triton.jit
def _ages(stamp, pinned, offs, inside, below, AGE_CAP: tl.constexpr):
    """Eviction age of slots ``offs`` (0: not evictable), as ``torch.slot_ages``."""
    age = below - tl.load(stamp + offs, mask=inside, other=below)
    held = tl.load(pinned + offs, mask=inside, other=1) != 0
    return tl.where(held | (age <= 0), 0, tl.minimum(age, AGE_CAP))


@triton.jit(do_not_specialize=["capacity", "below", "max_new", "tiles"])
def _age_histogram_kernel(stamp, pinned, counters, hists, prefix, capacity, below, max_new, tiles,
                          AGE_CAP: tl.constexpr, BINS: tl.constexpr, SLOT_TILE: tl.constexpr,
                          PREFIX_ROWS: tl.constexpr, PDL: tl.constexpr = 0):
    """Each program: the eviction-age histogram of its tile of slots into ``hists`` row; the last to finish then
    finds the victim age (:func:`_victim_prefix`). Nothing when no miss is to be admitted."""
    wait_for_previous_grid(PDL)
    wanted = tl.minimum(tl.load(counters + MISSES), max_new)
    if wanted > 0:
        pid = tl.program_id(0)
        offs = pid * SLOT_TILE + tl.arange(0, SLOT_TILE)
        age = _ages(stamp, pinned, offs, offs < capacity, below, AGE_CAP)
        tl.store(hists + pid * BINS + tl.arange(0, BINS), tl.histogram(age.to(tl.int32), BINS))
        tl.debug_barrier()  # every thread's stores precede the release below
        if tl.atomic_add(counters + FINISHED, 1, sem="acq_rel") == tiles - 1:
            _victim_prefix(counters, hists, prefix, wanted, tiles, AGE_CAP, BINS, PREFIX_ROWS)


@triton.jit
def _victim_prefix(counters, hists, prefix, wanted, tiles, AGE_CAP: tl.constexpr, BINS: tl.constexpr,
                   PREFIX_ROWS: tl.constexpr):
    """From the tiles' histograms: the victim age (the oldest age with at least ``wanted`` evictable slots that
    old or older; 1 when there are fewer) into counters OLDEST, the numbers of older slots and of slots of that age
    into OLDER and TIES, and per tile the older slots and the slots of that age in the tiles before it into
    ``prefix`` [tiles, 2]."""
    bins = tl.arange(0, BINS)
    rows = tl.arange(0, PREFIX_ROWS)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, tiles, PREFIX_ROWS):
        inside = (start + rows)[:, None] < tiles
        hist += tl.sum(tl.load(hists + (start + rows)[:, None] * BINS + bins[None, :], mask=inside, other=0,
                               cache_modifier=".cg"), 0)
    hist = tl.where((bins >= 1) & (bins <= AGE_CAP), hist, 0)  # bin 0: not evictable
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # slots of this age or older
    oldest = tl.maximum(tl.sum(((bins >= 1) & (at_least >= wanted)).to(tl.int32), 0), 1)
    older_total, ties_total = oldest * 0, oldest * 0
    for start in range(0, tiles, PREFIX_ROWS):
        inside = (start + rows) < tiles
        counts = tl.load(hists + (start + rows)[:, None] * BINS + bins[None, :], mask=inside[:, None], other=0,
                         cache_modifier=".cg")
        older = tl.sum(tl.where(bins[None, :] > oldest, counts, 0), 1)
        ties = tl.sum(tl.where(bins[None, :] == oldest, counts, 0), 1)
        tl.store(prefix + (start + rows) * 2, older_total + tl.cumsum(older, 0) - older, mask=inside)
        tl.store(prefix + (start + rows) * 2 + 1, ties_total + tl.cumsum(ties, 0) - ties, mask=inside)
        older_total += tl.sum(older, 0)
        ties_total += tl.sum(ties, 0)
    tl.store(counters + OLDEST, oldest)
    tl.store(counters + OLDER, older_total)
    tl.store(counters + TIES, ties_total)


@triton.jit(do_not_specialize=["capacity", "below", "max_new"])
def _rank_victims_kernel(stamp, pinned, counters, prefix, victims, capacity, below, max_new, AGE_CAP: tl.constexpr,
                         SLOT_TILE: tl.constexpr, PDL: tl.constexpr = 0):
    """Each program ranks its tile's victims into ``victims``: every slot older than the victim age (ranks from
    0), then those of that age (ranks from OLDER), each group in slot order, while the rank is below the misses."""
    wait_for_previous_grid(PDL)
    wanted = tl.minimum(tl.load(counters + MISSES), max_new)
    if wanted > 0:
        pid = tl.program_id(0)
        oldest = tl.load(counters + OLDEST)
        offs = pid * SLOT_TILE + tl.arange(0, SLOT_TILE)
        age = _ages(stamp, pinned, offs, offs < capacity, below, AGE_CAP)
        for tie in tl.static_range(2):
            flags = ((age == oldest) if tie else (age > oldest)).to(tl.int32)
            base = (tl.load(counters + OLDER) + tl.load(prefix + pid * 2 + 1)) if tie else tl.load(prefix + pid * 2)
            rank = base + tl.cumsum(flags, 0) - 1
            tl.store(victims + rank, offs.to(tl.int64), mask=(flags != 0) & (rank < wanted))


@triton.jit(do_not_specialize=["n", "stamp_value", "max_new", "width", "sel_stride", "table_stride"])
def _assign_kernel(pieces, miss_rank, slots, victims, slot_of, piece_in, stamp, counters, fetch_pieces,
                   fetch_slots, tally, sel_idx, table, src, dst, n, stamp_value, max_new, width, sel_stride,
                   table_stride,
                   WRITE_TABLE: tl.constexpr, HAS_TALLY: tl.constexpr, COPY: tl.constexpr, ROW_WORDS: tl.constexpr,
                   BLOCK: tl.constexpr, TILE: tl.constexpr, PDL: tl.constexpr = 0):
    wait_for_previous_grid(PDL)
    offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
    inside = offs < n
    candidates = tl.load(counters + OLDER) + tl.load(counters + TIES)
    usable = tl.minimum(tl.minimum(tl.load(counters + MISSES), max_new), candidates)
    rank = tl.load(miss_rank + offs, mask=inside, other=-1)
    take = (rank >= 0) & (rank < usable)
    piece = tl.load(pieces + offs, mask=take, other=0)
    slot = tl.load(victims + rank, mask=take, other=0)
    old = tl.load(piece_in + slot, mask=take, other=-1)
    tl.store(slot_of + old, tl.full([TILE], -1, tl.int64), mask=take & (old >= 0))
    tl.store(piece_in + slot, piece, mask=take)
    tl.store(slot_of + piece, slot, mask=take)
    tl.store(stamp + slot, tl.full([TILE], stamp_value, tl.int64), mask=take)
    tl.store(slots + offs, slot, mask=take)
    tl.store(fetch_pieces + rank, piece, mask=take)
    tl.store(fetch_slots + rank, slot, mask=take)
    if WRITE_TABLE:  # the attention table of the selection's rows: slot of each listed logical block
        final = tl.where(take, slot, tl.load(slots + offs, mask=inside & ~take, other=-1))
        row = offs // width
        logical = tl.load(sel_idx + row * sel_stride + offs % width, mask=inside, other=0)
        tl.store(table + row * table_stride + logical, final.to(tl.int32), mask=inside & (final >= 0))
    taken = tl.sum(take.to(tl.int32), 0)
    tl.atomic_add(counters + ADMITTED, taken)
    if HAS_TALLY:
        tl.atomic_add(tally + 1, taken.to(tl.int64))
    if COPY:  # this program's admitted misses hold ranks first .. first + taken - 1 (the probe ranked them at once)
        first = tl.min(tl.where(take, rank, n), 0)
        tl.debug_barrier()  # the fetch lists stored above are visible to every thread of the program
        words = tl.arange(0, BLOCK)
        for k in range(taken):
            source = src + tl.load(fetch_pieces + first + k) * ROW_WORDS
            target = dst + tl.load(fetch_slots + first + k) * ROW_WORDS
            for start in tl.static_range(0, ROW_WORDS, BLOCK):
                mask = start + words < ROW_WORDS
                tl.store(target + start + words, tl.load(source + start + words, mask=mask), mask=mask)


_PROBE, _ASSIGN = Launcher(_probe_kernel), Launcher(_assign_kernel)
_AGE_HISTOGRAM, _RANK_VICTIMS = Launcher(_age_histogram_kernel), Launcher(_rank_victims_kernel)


def admit(slot_of: torch.Tensor, piece_in: torch.Tensor, stamp: torch.Tensor, pinned: torch.Tensor,
          pieces: torch.Tensor, wanted: torch.Tensor, *, below: int, stamp_value: int, max_new: int,
          tally: torch.Tensor | None = None, validate: bool = True
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make ``pieces[wanted]`` resident on the device without a host sync; contract of ``torch.admit``, with
    ``fetch_count`` a device tensor. ``validate=False`` skips the argument checks (a caller that built them)."""
    if validate:
        _check_state(slot_of, piece_in, stamp, pinned, tally)
        check_tensor("pieces", pieces, 1, (torch.int64,), slot_of.device, "[n] piece ids")
        check_tensor("wanted", wanted, 1, (torch.bool,), slot_of.device, "[n] mask")
        if pieces.shape != wanted.shape:
            raise ValueError(f"pieces / wanted: shapes {tuple(pieces.shape)} / {tuple(wanted.shape)} differ")
        _check_piece_ids("pieces", pieces, slot_of, wanted)
    slots, fetch_pieces, fetch_slots, count = _launch(slot_of, piece_in, stamp, pinned, pieces, wanted, None, None,
                                                      below, stamp_value, max_new, tally, None, None)
    return slots, fetch_pieces, fetch_slots, count


def admit_selection(slot_of: torch.Tensor, piece_in: torch.Tensor, stamp: torch.Tensor, pinned: torch.Tensor,
                    sel_idx: torch.Tensor, sel_count: torch.Tensor, block_table: torch.Tensor, *, below: int,
                    stamp_value: int, max_new: int, tally: torch.Tensor | None = None,
                    rows: tuple[torch.Tensor, torch.Tensor] | None = None, tokens: tuple | None = None,
                    validate: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`admit` of the pieces a block selection lists, and the attention table over the pool; contract of
    ``torch.admit_selection``, except that table entries of unlisted blocks are undefined (not 0). With ``rows``,
    the admitted pieces' rows are copied in the same launches (by the programs that admitted them); with
    ``tokens``, the decode tokens are written by extra programs of the first launch. ``validate=False`` skips the
    argument checks."""
    if validate:
        _check_state(slot_of, piece_in, stamp, pinned, tally)
        _check_selection(sel_idx, sel_count, block_table, slot_of.device)
        if rows is not None:
            _check_rows("rows[0]", rows[0], rows[1], slot_of.device)
            _check_rows("rows[1]", rows[1], rows[0], slot_of.device)
        if tokens is not None:
            _check_tokens(tokens[0], slot_of, stamp, pinned, *tokens[1:])
    batch, heads, width = sel_idx.shape
    pieces = _int64_buffers(slot_of.device, batch * heads * width)[0]
    # entries of unlisted blocks stay unwritten: the sparse decode kernel reads listed entries only; rows padded to
    # 16 entries (its strides keep one specialisation of the attention kernel as the table widens)
    table = padded_empty(batch * heads, block_table.shape[1], dtype=torch.int32, device=slot_of.device)
    _, fetch_pieces, fetch_slots, count = _launch(slot_of, piece_in, stamp, pinned, pieces, None,
                                                  (sel_idx, sel_count, block_table, heads), table, below, stamp_value,
                                                  max_new, tally, rows, tokens)
    return table, pieces.view(batch, heads, width), fetch_pieces, fetch_slots, count


def _launch(slot_of, piece_in, stamp, pinned, pieces, wanted, selection, table, below, stamp_value, max_new, tally,
            rows, tokens):
    """The four launches; ``selection`` = (sel_idx, sel_count, block_table, heads) or None (``pieces`` / ``wanted``
    given); ``rows`` = (src, dst) to copy the admitted pieces' rows, or None; ``tokens`` = (kv, pieces, offsets,
    key, value) of :func:`write_tokens` to write in the first launch, or None."""
    device = slot_of.device
    n, capacity = pieces.numel(), piece_in.numel()
    counters = torch.zeros(OLDEST.value + 1, dtype=torch.int32, device=device)
    n_tokens = tokens[1].numel() if tokens is not None else 0
    tiles = cdiv(capacity, _SLOT_TILE)
    slots, miss_rank, fetch_pieces, fetch_slots, victims, token_slots, hists, prefix = _int64_buffers(
        device, n, n, n, n, max(min(n, max_new, capacity), 1), n_tokens, tiles * _BINS // 2, tiles)
    tally_arg = tally if tally is not None else counters
    sel_idx, sel_count, block_table, heads = selection or (pieces, counters, counters, 1)
    width, sel_stride = sel_idx.shape[-1], sel_idx.stride(-2) if sel_idx.dim() > 1 else 0
    entries = (cdiv(max(n, 1), _TILE),)
    src, dst, row_words = _word_views(*rows) if rows is not None else (counters, counters, 1)
    kv, token_pieces, offsets, key, value = tokens if tokens is not None else (counters,) * 5
    if tokens is not None:
        key, value = _as_token_rows(kv, key, value)
    head_dim = kv.shape[4] if tokens is not None else 1
    _PROBE((entries[0] + n_tokens,), pieces, wanted if wanted is not None else counters, sel_idx, sel_count,
           block_table, slot_of, stamp, slots, miss_rank, counters, tally_arg, kv, pinned, token_pieces, offsets, key,
           value, token_slots, n, stamp_value, width, sel_stride, block_table.stride(0), heads, entries[0],
           FROM_SELECTION=selection is not None, HAS_TALLY=tally is not None, WRITE_TOKENS=tokens is not None,
           BLOCK_SIZE=kv.shape[2] if tokens is not None else 1, HEAD_DIM=head_dim, DIM_POW2=next_pow2(head_dim),
           TILE=_TILE, num_warps=8)
    hists, prefix = hists.view(torch.int32), prefix.view(torch.int32)  # [tiles, _BINS] and [tiles, 2]
    _AGE_HISTOGRAM((tiles,), stamp, pinned, counters, hists, prefix, capacity, below, max_new, tiles, AGE_CAP=AGE_CAP,
                   BINS=_BINS, SLOT_TILE=_SLOT_TILE, PREFIX_ROWS=_PREFIX_ROWS, num_warps=8)
    _RANK_VICTIMS((tiles,), stamp, pinned, counters, prefix, victims, capacity, below, max_new, AGE_CAP=AGE_CAP,
                  SLOT_TILE=_SLOT_TILE, num_warps=8)
    _ASSIGN(entries, pieces, miss_rank, slots, victims, slot_of, piece_in, stamp, counters, fetch_pieces, fetch_slots,
            tally_arg, sel_idx, table if table is not None else counters, src, dst, n, stamp_value, max_new, width,
            sel_stride, table.stride(0) if table is not None else 0, WRITE_TABLE=table is not None,
            HAS_TALLY=tally is not None, COPY=rows is not None,
            ROW_WORDS=row_words, BLOCK=min(next_pow2(row_words), 2048), TILE=_TILE)
    return slots, fetch_pieces, fetch_slots, counters[ADMITTED.value:ADMITTED.value + 1]


@triton.jit(do_not_specialize=["stamp_value"])
def _write_tokens_kernel(kv, slot_of, stamp, pinned, pieces, offsets, key, value, slots, stamp_value,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_POW2: tl.constexpr,
                         PDL: tl.constexpr = 0):
    wait_for_previous_grid(PDL)
    _write_token_row(kv, slot_of, stamp, pinned, pieces, offsets, key, value, slots, tl.program_id(0), stamp_value,
                     BLOCK_SIZE, HEAD_DIM, DIM_POW2)


_WRITE_TOKENS = Launcher(_write_tokens_kernel)


@triton.jit
def _write_token_row(kv, slot_of, stamp, pinned, pieces, offsets, key, value, slots, row, stamp_value,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_POW2: tl.constexpr):
    """Token ``row`` into the resident piece ``pieces[row]`` at ``offsets[row]``; its slot pinned and stamped."""
    slot = tl.load(slot_of + tl.load(pieces + row))
    tl.store(slots + row, slot)
    tl.store(stamp + slot, stamp_value.to(tl.int64))
    tl.store(pinned + slot, 1)
    dims = tl.arange(0, DIM_POW2)
    inside = dims < HEAD_DIM
    token = kv + (slot * 2 * BLOCK_SIZE + tl.load(offsets + row)) * HEAD_DIM + dims
    tl.store(token, tl.load(key + row * HEAD_DIM + dims, mask=inside), mask=inside)
    tl.store(token + BLOCK_SIZE * HEAD_DIM, tl.load(value + row * HEAD_DIM + dims, mask=inside), mask=inside)


def write_tokens(kv: torch.Tensor, slot_of: torch.Tensor, stamp: torch.Tensor, pinned: torch.Tensor,
                 pieces: torch.Tensor, offsets: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                 stamp_value: int, validate: bool = True) -> torch.Tensor:
    """One launch for ``torch.write_tokens`` (same contract; ``kv`` contiguous). ``validate=False`` skips the
    argument checks (a caller that built them)."""
    if validate:
        _check_tokens(kv, slot_of, stamp, pinned, pieces, offsets, key, value)
    slots = torch.empty_like(pieces)
    if pieces.numel():
        _, _, block_size, _, head_dim = kv.shape
        key, value = _as_token_rows(kv, key, value)
        _WRITE_TOKENS((pieces.numel(),), kv, slot_of, stamp, pinned, pieces, offsets, key, value, slots, stamp_value,
                      BLOCK_SIZE=block_size, HEAD_DIM=head_dim, DIM_POW2=next_pow2(head_dim))
    return slots


@triton.jit
def _copy_rows_kernel(src, dst, src_idx, dst_idx, count, ROW_WORDS: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr = 0):
    wait_for_previous_grid(PDL)
    n = tl.load(count)
    words = tl.arange(0, BLOCK)
    for k in tl.range(tl.program_id(0), n, tl.num_programs(0)):
        row = tl.load(src_idx + k)
        if row >= 0:
            source = src + row * ROW_WORDS
            target = dst + tl.load(dst_idx + k) * ROW_WORDS
            for start in tl.range(0, ROW_WORDS, BLOCK):
                mask = start + words < ROW_WORDS
                tl.store(target + start + words, tl.load(source + start + words, mask=mask), mask=mask)


_COPY_ROWS = Launcher(_copy_rows_kernel)


def copy_rows(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
              count: torch.Tensor, *, programs: int = 256, validate: bool = True) -> None:
    """``dst[dst_idx[k]] = src[src_idx[k]]`` for ``k < count[0]`` and ``src_idx[k] >= 0``, the count read on the
    device.

    Args:
        src, dst: contiguous 2-D tensors of one dtype and row width; one of them may be pinned host memory (read
            or written over PCIe in place) when the other is on a GPU.
        src_idx, dst_idx: int64 row indices on the indices' device (the GPU's), at least ``count[0]`` each.
        count: [1] int32 on that device.
        programs: rows are spread over this many programs (each keeps one row's reads in flight).
        validate: False skips the argument checks (a caller that built them; each pinned check asks the driver).
    """
    if validate:
        _check_copy(src, dst, src_idx, dst_idx, count)
    src_words, dst_words, row_words = _word_views(src, dst)
    _COPY_ROWS((max(min(programs, src_idx.numel()), 1),), src_words, dst_words, src_idx, dst_idx, count,
               ROW_WORDS=row_words, BLOCK=min(next_pow2(row_words), 2048))


def _as_token_rows(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``key`` / ``value`` ``[n, head_dim]`` in ``kv``'s dtype (torch's rounding, as the twin's), contiguous."""
    return key.to(kv.dtype).contiguous(), value.to(kv.dtype).contiguous()


def _int64_buffers(device: torch.device, *lengths: int) -> list[torch.Tensor]:
    """Uninitialised int64 tensors of ``lengths`` from one allocation (each starting 16-byte aligned, as Triton
    specialises pointers on it): a call's scratch costs the caching allocator one request."""
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length + (length & 1))
    buffer = torch.empty(starts[-1], dtype=torch.int64, device=device)
    return [buffer[start:start + length] for start, length in zip(starts, lengths)]


def _word_views(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two row tensors of one width viewed as the widest words (at most 8 bytes) their addresses and row size allow,
    and the words per row."""
    word = min(alignment(src.data_ptr(), dst.data_ptr(), src.shape[1] * src.element_size()), 8)
    return src.view(_WORD_DTYPES[word]), dst.view(_WORD_DTYPES[word]), src.shape[1] * src.element_size() // word


def _check_copy(src, dst, src_idx, dst_idx, count) -> None:
    """Raise ValueError naming the argument of ``copy_rows`` that is not what it takes."""
    device = count.device
    for name, rows in (("src", src), ("dst", dst)):
        _check_rows(name, rows, src, device)
    for name, index in (("src_idx", src_idx), ("dst_idx", dst_idx)):
        check_tensor(name, index, 1, (torch.int64,), device, "[n] row indices")
    check_tensor("count", count, 1, (torch.int32,), device, "[1] row count")


def _check_rows(name: str, rows: torch.Tensor, like: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless ``rows`` is a contiguous 2-D tensor shaped and typed like ``like``, on ``device`` or
    in pinned host memory."""
    if rows.dim() != 2 or not rows.is_contiguous() or rows.dtype != like.dtype or rows.shape[1] != like.shape[1]:
        raise ValueError(f"{name}: {rows.dtype} of shape {tuple(rows.shape)} (contiguous={rows.is_contiguous()}); "
                         f"expected contiguous [rows, {like.shape[1]}] of {like.dtype}")
    if rows.device.type == "cpu" and device.type == "cuda":
        if not rows.is_pinned():
            raise ValueError(f"{name} is in pageable host memory; a GPU copy reads or writes pinned memory only")
        return
    check_device(name, rows, device)


def _check_state(slot_of, piece_in, stamp, pinned, tally) -> None:
    """Raise ValueError naming the pool tensor that is not what ``admit`` takes."""
    for name, tensor, dtypes in (("slot_of", slot_of, (torch.int64,)), ("piece_in", piece_in, (torch.int64,)),
                                 ("stamp", stamp, (torch.int64,)), ("pinned", pinned, (torch.bool,))):
        check_tensor(name, tensor, 1, dtypes, slot_of.device, "a 1-D tensor")
    if not (piece_in.numel() == stamp.numel() == pinned.numel()):
        raise ValueError(f"piece_in / stamp / pinned: {piece_in.numel()} / {stamp.numel()} / {pinned.numel()} "
                         "slots; they must agree")
    if tally is not None:
        check_tensor("tally", tally, 1, (torch.int64,), slot_of.device, "[2] counters")


def _check_tokens(kv, slot_of, stamp, pinned, pieces, offsets, key, value) -> None:
    """Raise ValueError naming the argument of ``write_tokens`` that is not what it takes (the kernel addresses
    ``kv`` as contiguous ``[C, 2, block_size, 1, head_dim]``)."""
    device = slot_of.device
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != 1 \
            or not kv.is_contiguous() or kv.device != device:
        got = f"shape {tuple(kv.shape)} contiguous={kv.is_contiguous()} on {kv.device}" \
            if isinstance(kv, torch.Tensor) else repr(kv)
        raise ValueError(f"kv: got {got}, expected a contiguous [capacity, 2, block_size, 1, head_dim] on {device}")
    for name, tensor, dtypes in (("slot_of", slot_of, (torch.int64,)), ("stamp", stamp, (torch.int64,)),
                                 ("pinned", pinned, (torch.bool,)), ("pieces", pieces, (torch.int64,)),
                                 ("offsets", offsets, (torch.int64,))):
        check_tensor(name, tensor, 1, dtypes, device, "a 1-D tensor")
    for name, tensor in (("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (pieces.numel(), kv.shape[4]):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else repr(tensor)
            raise ValueError(f"{name}: got shape {got}, expected [{pieces.numel()}, {kv.shape[4]}] (one token per "
                             "piece)")
        check_device(name, tensor, device)
    if pieces.shape != offsets.shape or stamp.numel() != pinned.numel() or stamp.numel() != kv.shape[0]:
        raise ValueError(f"pieces / offsets: {tuple(pieces.shape)} / {tuple(offsets.shape)}; stamp / pinned / kv: "
                         f"{stamp.numel()} / {pinned.numel()} / {kv.shape[0]} slots; each group must agree")
    _check_piece_ids("pieces", pieces, slot_of)
    if pieces.numel() and bool((slot_of[pieces] < 0).any()):  # a host sync: the validating path only
        raise ValueError("pieces: some are not resident; write_tokens writes into resident pieces only (admit them "
                         "first)")
    if offsets.numel() and not 0 <= int(offsets.min()) <= int(offsets.max()) < kv.shape[2]:
        raise ValueError(f"offsets: range {int(offsets.min())}..{int(offsets.max())}, expected 0..{kv.shape[2] - 1} "
                         "(token positions in a block)")


def _check_piece_ids(name: str, pieces: torch.Tensor, slot_of: torch.Tensor, wanted: torch.Tensor | None = None
                     ) -> None:
    """Raise ValueError unless every (wanted) id of ``pieces`` indexes ``slot_of`` (a host sync: validation only)."""
    ids = pieces if wanted is None else pieces[wanted]
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < slot_of.numel():
        raise ValueError(f"{name}: ids range {int(ids.min())}..{int(ids.max())}, expected 0..{slot_of.numel() - 1} "
                         "(the pool's host pieces)")


def _check_selection(sel_idx, sel_count, block_table, device) -> tuple[int, int, int]:
    """(batch, heads, width) of a selection, after checking its tensors."""
    check_tensor("sel_idx", sel_idx, 3, (torch.int32,), device, "[batch, heads, width] logical blocks")
    batch, heads, width = sel_idx.shape
    check_tensor("sel_count", sel_count, 2, (torch.int32,), device, "[batch, heads] counts")
    check_tensor("block_table", block_table, 2, (torch.int32,), device, "[batch, max_blocks] host blocks")
    if tuple(sel_count.shape) != (batch, heads) or block_table.shape[0] != batch:
        raise ValueError(f"sel_count {tuple(sel_count.shape)} / block_table {tuple(block_table.shape)}: expected "
                         f"[{batch}, {heads}] / [{batch}, max_blocks] for sel_idx {tuple(sel_idx.shape)}")
    if not (evenly_strided_rows(sel_idx) and evenly_strided_rows(block_table) and sel_count.is_contiguous()):
        raise ValueError(f"sel_idx strides {sel_idx.stride()}, sel_count strides {sel_count.stride()}, block_table "
                         f"strides {block_table.stride()}: expected rows of contiguous entries (sel_idx's "
                         "[batch * heads] rows evenly spaced; any row stride), sel_count contiguous")
    return batch, heads, width
