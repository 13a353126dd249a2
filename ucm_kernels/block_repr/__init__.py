"""Per-block key representations for GSA block selection, kept beside the paged KV cache.

For each physical block and KV head: the per-channel min and max key (Quest) and the mean key, indexed by
physical block id like the cache. They are computed once, when a block becomes full, never over the whole
context per step:

    filled = blocks_filled(seq_lens_before, seq_lens_after, block_table, block_size)  # once per step
    for layer in layers:
        update_block_repr(key_cache[layer], filled, kmin[layer], kmax[layer], kmean[layer])

Repr dtype: any of bf16/fp16/fp32/float8_e4m3fn. We store the cache dtype (:func:`empty_block_repr`'s
default): min and max are then exact copies of cache values, the mean is rounded once from fp32, and selection
reads half the bytes of fp32 reprs (Quest reads kmin+kmax, the mean rule kmean only). fp8 reprs halve those
bytes again: each (block, KV head) gets a power-of-two scale ``kscale`` (fp32, 4 bytes beside 2 x head_dim
bytes of kmin+kmax) that brings its largest |key| into [128, 256), so any finite key fits e4m3fn (no inf, max
448) without subnormals at the top of the block's range; kmin is rounded down and kmax up, so the Quest score
computed from them stays an upper bound of the exact one:

    kmin, kmax, kmean, kscale = empty_block_repr(key_cache, torch.float8_e4m3fn)
    update_block_repr(key_cache, filled, kmin, kmax, kmean, kscale)
    select_blocks(q, kmin, kmax, kmean, block_table, seq_lens, ..., kscale=kscale)

A per-block scale, unlike one global scale, needs no knowledge of the keys to come (blocks are filled one at a
time, never revisited); it adds 4 bytes to the 256 of fp8 kmin+kmax per (block, KV head) at head_dim 128 (1.6%).
"""
from .naive import naive_update_block_repr
from .storage import blocks_filled, empty_block_repr, empty_block_repr_for
from .torch import update_block_repr as torch_update_block_repr
from .triton import FP8, update_block_repr, update_block_repr_ranges

__all__ = ["update_block_repr", "update_block_repr_ranges", "blocks_filled", "empty_block_repr", "empty_block_repr_for",
           "naive_update_block_repr", "torch_update_block_repr", "FP8"]
