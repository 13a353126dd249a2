"""Plain-torch residency bookkeeping and indexed row copies: the CPU path and the reference of ``triton.py``.

Same contract as the kernels (see the package doc), with the order the kernels have in Triton's interpreter:
misses ranked by entry, victims by slot.
"""
import torch

AGE_CAP = 255  # ages (``below - stamp``) at or above this share the oldest bucket


def slot_ages(stamp: torch.Tensor, pinned: torch.Tensor, below: int) -> torch.Tensor:
    """``[C]`` int64 eviction age of each slot: ``min(below - stamp, AGE_CAP)`` for slots not pinned and stamped
    below ``below``, 0 for the others (not evictable)."""
    age = (below - stamp).clamp(max=AGE_CAP)
    return torch.where(pinned | (age <= 0), 0, age)


def victim_age(ages: torch.Tensor, wanted: int) -> int:
    """The youngest age whose slots, with every older one, number at least ``wanted`` (1: all evictable slots are
    too few; ``AGE_CAP + 1``: nothing is wanted)."""
    if wanted == 0:
        return AGE_CAP + 1
    at_least = torch.bincount(ages, minlength=AGE_CAP + 1).flip(0).cumsum(0).flip(0)
    return max(int((at_least[1:] >= wanted).sum()), 1)


def admit(slot_of: torch.Tensor, piece_in: torch.Tensor, stamp: torch.Tensor, pinned: torch.Tensor,
          pieces: torch.Tensor, wanted: torch.Tensor, *, below: int, stamp_value: int, max_new: int,
          tally: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make ``pieces[wanted]`` resident: hits get ``stamp_value``; misses take the slots of oldest age.

    Args:
        slot_of: [P] int64, the slot holding each piece or -1 (updated).
        piece_in: [C] int64, the piece each slot holds or -1 (updated).
        stamp: [C] int64 stamps (updated); pinned: [C] bool, slots never evicted.
        pieces: [N] int64 piece ids, distinct where wanted; wanted: [N] bool.
        below: slots stamped below this (after the hits are stamped) and not pinned may be evicted.
        stamp_value: the stamp of every wanted piece.
            Victims: every evictable slot older than the victim age (:func:`victim_age`), then slots of that age,
            each group in slot order.
        max_new: at most this many misses are admitted (those of lowest rank).
        tally: optional [2] int64, ``+= (wanted entries, admitted misses)``.
    Returns:
        slots [N] int64 (-1: not wanted, or a miss not admitted), fetch_pieces [N] and fetch_slots [N] int64
        (the admitted misses in rank order, in the first ``fetch_count`` entries), fetch_count [1] int32.
    """
    slots = torch.where(wanted, slot_of[torch.where(wanted, pieces, 0)], -1)
    hit = slots >= 0
    stamp[slots[hit]] = stamp_value
    missing = (wanted & ~hit).nonzero().flatten()
    ages = slot_ages(stamp, pinned, below)
    limit = min(missing.numel(), max_new)
    oldest = victim_age(ages, limit)
    candidates = torch.cat([(ages > oldest).nonzero().flatten(), (ages == oldest).nonzero().flatten()])
    count = min(limit, candidates.numel())
    entries, victims = missing[:count], candidates[:count]
    old = piece_in[victims]
    slot_of[old[old >= 0]] = -1
    new_pieces = pieces[entries]
    piece_in[victims], slot_of[new_pieces], stamp[victims] = new_pieces, victims, stamp_value
    slots[entries] = victims
    fetch_pieces, fetch_slots = torch.full_like(pieces, -1), torch.full_like(pieces, -1)
    fetch_pieces[:count], fetch_slots[:count] = new_pieces, victims
    if tally is not None:
        tally += torch.tensor([int(wanted.sum()), count], dtype=tally.dtype)
    return slots, fetch_pieces, fetch_slots, torch.tensor([count], dtype=torch.int32)


def selection_pieces(sel_idx: torch.Tensor, sel_count: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, width]`` int64 host pieces (``host_block * heads + head``) a selection lists, -1 elsewhere.

    Args:
        sel_idx: [batch, heads, width] int32 logical blocks (-1 padded); sel_count: [batch, heads] int32.
        block_table: [batch, max_blocks] int32 host block of each logical block.
    """
    batch, heads, width = sel_idx.shape
    listed = (torch.arange(width, device=sel_idx.device) < sel_count[..., None]) & (sel_idx >= 0)
    logical = torch.where(listed, sel_idx, 0).long().reshape(batch, heads * width)
    host = block_table.long().gather(1, logical).view(batch, heads, width)
    pieces = host * heads + torch.arange(heads, device=sel_idx.device)[None, :, None]
    return torch.where(listed, pieces, -1)


def admit_selection(slot_of: torch.Tensor, piece_in: torch.Tensor, stamp: torch.Tensor, pinned: torch.Tensor,
                    sel_idx: torch.Tensor, sel_count: torch.Tensor, block_table: torch.Tensor, *, below: int,
                    stamp_value: int, max_new: int, tally: torch.Tensor | None = None,
                    rows: tuple[torch.Tensor, torch.Tensor] | None = None, tokens: tuple | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`admit` of the pieces a selection lists (:func:`selection_pieces`), and the attention table.

    With ``rows`` = (src, dst) (2-D tensors of one width), each admitted piece's row is copied as well:
    ``dst[slot] = src[piece]`` (:func:`copy_rows` of the fetch lists). With ``tokens`` = (kv, pieces, offsets, key,
    value), :func:`write_tokens` runs first (stamped ``stamp_value``; the pieces must be resident).

    Returns:
        table [batch * heads, max_blocks] int32: the slot of each listed logical block of a (request, KV head)
        row (0 elsewhere); pieces [batch, heads, width] int64 (-1 unlisted); fetch_pieces, fetch_slots,
        fetch_count as :func:`admit`'s.
    """
    if tokens is not None:
        write_tokens(tokens[0], slot_of, stamp, pinned, *tokens[1:], stamp_value=stamp_value)
    batch, heads, width = sel_idx.shape
    pieces = selection_pieces(sel_idx, sel_count, block_table)
    slots, fetch_pieces, fetch_slots, count = admit(slot_of, piece_in, stamp, pinned, pieces.flatten(),
                                                    pieces.flatten() >= 0, below=below, stamp_value=stamp_value,
                                                    max_new=max_new, tally=tally)
    max_blocks = block_table.shape[1]
    table = torch.zeros(batch * heads, max_blocks + 1, dtype=torch.int32, device=sel_idx.device)  # last: unlisted
    listed = (slots >= 0).view(batch * heads, width)
    columns = torch.where(listed, sel_idx.reshape(batch * heads, width).long(), max_blocks)
    table.scatter_(1, columns, torch.where(listed, slots.view(batch * heads, width), 0).int())
    if rows is not None:
        copy_rows(*rows, fetch_pieces, fetch_slots, count)
    return table[:, :max_blocks], pieces, fetch_pieces, fetch_slots, count


def write_tokens(kv: torch.Tensor, slot_of: torch.Tensor, stamp: torch.Tensor, pinned: torch.Tensor,
                 pieces: torch.Tensor, offsets: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                 stamp_value: int) -> torch.Tensor:
    """Write one token into each of the resident ``pieces``, pinning and stamping their slots.

    Args:
        kv: [C, 2, block_size, 1, head_dim] the pool's pieces (K then V).
        slot_of: [P] int64; stamp: [C] int64; pinned: [C] bool (updated).
        pieces: [R] int64 resident pieces; offsets: [R] int64 token position in each piece's block.
        key, value: [R, head_dim] the tokens (cast to kv's dtype).
    Returns:
        [R] int64 slots of the pieces.
    Raises:
        ValueError: a piece is not resident (its token would land in another piece's slot).
    """
    slots = slot_of[pieces]
    if bool((slots < 0).any()):
        raise ValueError(f"pieces: {pieces[slots < 0].tolist()[:8]} are not resident; write_tokens writes into "
                         "resident pieces only (admit them first)")
    stamp.index_fill_(0, slots, stamp_value)
    pinned.index_fill_(0, slots, True)
    kv[slots, 0, offsets, 0] = key.to(kv.dtype)
    kv[slots, 1, offsets, 0] = value.to(kv.dtype)
    return slots


def copy_rows(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
              count: torch.Tensor) -> None:
    """``dst[dst_idx[k]] = src[src_idx[k]]`` for ``k < count[0]`` and ``src_idx[k] >= 0`` (rows of two 2-D
    tensors of one width)."""
    n = int(count[0])
    keep = src_idx[:n] >= 0
    rows = src.index_select(0, src_idx[:n][keep].to(src.device))
    dst.index_copy_(0, dst_idx[:n][keep].to(dst.device), rows.to(dst.device))
