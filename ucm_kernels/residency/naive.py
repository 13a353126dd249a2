"""Loop reference of residency: one entry at a time, on Python lists, straight from the contract.

Hits are stamped first; then each miss, in entry order, takes an evictable slot (not pinned, stamped below
``below``) of the largest age ``min(below - stamp, AGE_CAP)``, ties to the lower slot. Which victim a given miss
takes is an implementation's choice (``torch.py`` and the kernels order victims older-than-the-victim-age first);
the sets of victims and of admitted pieces are the contract, and tests compare those.
"""
import torch

from .torch import AGE_CAP


def naive_selection_pieces(sel_idx: torch.Tensor, sel_count: torch.Tensor, block_table: torch.Tensor) -> list:
    """Per (request, KV head, j): ``block_table[request, sel_idx[...]] * heads + head`` for listed entries, -1 past
    the count or where the index is -1; nested lists ``[batch][heads][width]``."""
    batch, heads, width = sel_idx.shape
    out = [[[-1] * width for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for j in range(int(sel_count[b, h])):
                logical = int(sel_idx[b, h, j])
                if logical >= 0:
                    out[b][h][j] = int(block_table[b, logical]) * heads + h
    return out


def naive_admit(slot_of: torch.Tensor, piece_in: torch.Tensor, stamp: torch.Tensor, pinned: torch.Tensor,
                pieces: torch.Tensor, wanted: torch.Tensor, *, below: int, stamp_value: int, max_new: int) -> dict:
    """``admit``'s outcome on copies of the pool (the inputs are left alone), as plain Python values.

    Returns ``{"slots": [n] slot of each entry (-1: not wanted or not admitted), "victims": set of slots given to
    misses, "admitted": set of pieces brought in, "slot_of" / "piece_in" / "stamp": the pool after the call}``.
    """
    slot_of, piece_in, stamp = slot_of.tolist(), piece_in.tolist(), stamp.tolist()
    pinned = pinned.tolist()
    slots, misses = [-1] * pieces.numel(), []
    for k, (piece, want) in enumerate(zip(pieces.tolist(), wanted.tolist())):
        if not want:
            continue
        if slot_of[piece] >= 0:
            slots[k] = slot_of[piece]
            stamp[slot_of[piece]] = stamp_value
        else:
            misses.append(k)
    evictable = [s for s in range(len(stamp)) if not pinned[s] and below - stamp[s] > 0]
    evictable.sort(key=lambda s: (-min(below - stamp[s], AGE_CAP), s))
    victims, admitted = set(), set()
    for k, slot in zip(misses[:max_new], evictable):
        piece = int(pieces[k])
        if piece_in[slot] >= 0:
            slot_of[piece_in[slot]] = -1
        piece_in[slot], slot_of[piece], stamp[slot], slots[k] = piece, slot, stamp_value, slot
        victims.add(slot)
        admitted.add(piece)
    return {"slots": slots, "victims": victims, "admitted": admitted, "slot_of": slot_of, "piece_in": piece_in,
            "stamp": stamp}
