"""Device residency of pieces in a slot pool, and indexed row copies (GSA offload's hot pool).

    slots, fetch_pieces, fetch_slots, fetch_count = admit(slot_of, piece_in, stamp, pinned, pieces, wanted,
                                                          below=..., stamp_value=..., max_new=...)
    table, pieces, fetch_pieces, fetch_slots, fetch_count = admit_selection(..., sel_idx, sel_count, block_table,
                                                                           below=..., stamp_value=..., max_new=...)
    copy_rows(src, dst, src_idx, dst_idx, count)
    slots = write_tokens(kv, slot_of, stamp, pinned, pieces, offsets, key, value, stamp_value=...)

A pool of ``C`` slots holds pieces (rows of ``P`` host pieces); ``slot_of`` / ``piece_in`` map one to the other,
``stamp`` orders slots for eviction and ``pinned`` slots are never evicted. ``admit`` stamps the wanted pieces that
are resident and gives each missing one a slot: the evictable slots (not pinned, stamped below ``below``) of the
oldest ages go first, a slot's old piece is forgotten. It returns the list of admitted (piece, slot) pairs and
their count for ``copy_rows`` to move the bytes. ``admit_selection`` does it for the pieces a GSA block selection
lists and also writes the per-(request, KV head) table of their slots that attention over the pool reads;
``write_tokens`` writes a decode token into resident pieces (their slots pinned and stamped) in one launch. The
Triton versions run without a host sync (the count stays on the device), so a decode step can queue its misses
and their copies behind its selection.
"""
from .naive import naive_admit, naive_selection_pieces
from .torch import admit as torch_admit
from .torch import admit_selection as torch_admit_selection
from .torch import copy_rows as torch_copy_rows
from .torch import selection_pieces
from .torch import write_tokens as torch_write_tokens
from .triton import admit, admit_selection, copy_rows, write_tokens

__all__ = ["admit", "admit_selection", "copy_rows", "naive_admit", "naive_selection_pieces", "selection_pieces",
           "torch_admit", "torch_admit_selection", "torch_copy_rows", "torch_write_tokens", "write_tokens"]
