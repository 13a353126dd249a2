"""Selection reuse's per-step bookkeeping (``ucm_sparse.reuse.ReuseBook``): which decode rows keep their lists.

    reselect = reuse_step(seq_lens, block_table, slots, seq_len_state, tail_state, age_state,
                          block_size=..., every=..., num_slots=..., same_width=...)

Each row ``r`` of a decode step names its request's slot ``slots[r]``; the slot remembers the request's length, last
physical block and selection age at its previous step (``seq_len_state``, ``tail_state``, ``age_state``, int32
``[slots + 1]``, the last one a spare that padding rows share). A row keeps its previous lists (``reselect[r]`` 0)
when its request grew by exactly one token without opening a block, its last block is the same physical block, it has
a block, its slot is not the spare, the lists are younger than ``every`` steps and the table width is the one of the
previous step (``same_width``); otherwise it selects afresh (1). The state is updated in place: length and last block
recorded, the age advanced where a row keeps its lists and reset to 0 where it reselects. The Triton launch is one
kernel (a decode step's plan calls this every step: the torch twin's ~25 small ops cost more host time than the GPU
work they describe).
"""
from .naive import naive_reuse_step
from .torch import reuse_step as torch_reuse_step
from .triton import reuse_step

__all__ = ["naive_reuse_step", "reuse_step", "torch_reuse_step"]
