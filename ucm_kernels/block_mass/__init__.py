"""Attention mass per listed KV block: the second stage of GSA's two-stage selection.

    lse2 = block_lse2(q, key_cache, block_table, seq_lens, sel_idx, sel_count, scale=None)

For each (request, KV head) list of logical blocks (``ucm_kernels.block_select``'s lists) and each query head of
the KV head's group: ``log2 sum_t 2 ** (scale * log2(e) * q . k_t)`` over the block's tokens. The softmax mass a
block gets over the listed tokens is then ``2 ** (lse2 - log2 sum_blocks 2 ** lse2)``; ``ucm_sparse.ops`` sums it
over the group and keeps the blocks of most mass. Reads the listed blocks' keys once, in place.
"""
from .naive import naive_block_lse2
from .torch import block_mass as torch_block_mass
from .triton import block_lse2

__all__ = ["block_lse2", "naive_block_lse2", "torch_block_mass"]
