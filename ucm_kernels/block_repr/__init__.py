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
import torch

from .naive import naive_update_block_repr
from .triton import FP8, update_block_repr, update_block_repr_ranges

__all__ = ["update_block_repr", "update_block_repr_ranges", "blocks_filled", "empty_block_repr", "empty_block_repr_for",
           "naive_update_block_repr"]


def blocks_filled(seq_lens_before: torch.Tensor, seq_lens_after: torch.Tensor, block_table: torch.Tensor,
                  block_size: int) -> torch.Tensor:
    """Physical ids of the blocks that became full between two steps (request-major, ascending logical order).

    Args:
        seq_lens_before, seq_lens_after: ``[batch]`` integer token counts of each request at the last and the
            current call (0 before a request's first step).
        block_table: ``[batch, max_blocks_per_seq]`` integer, logical -> physical block id.
        block_size: tokens per block.
    Returns:
        ``[num_filled]`` tensor of block_table's dtype on its device: ``block_table[b, j]`` for every logical
        block j with ``seq_lens_before[b] // block_size <= j < seq_lens_after[b] // block_size``. On CUDA the
        count is read back once (a host sync): call it once per step and reuse the ids for every layer.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: got {block_size!r}, expected a positive int")
    if block_table.dim() != 2 or block_table.is_floating_point():
        raise ValueError(f"block_table: got shape {tuple(block_table.shape)} dtype {block_table.dtype}, "
                         "expected an integer [batch, max_blocks_per_seq] tensor")
    for name, lens in (("seq_lens_before", seq_lens_before), ("seq_lens_after", seq_lens_after)):
        if tuple(lens.shape) != (block_table.shape[0],) or lens.is_floating_point():
            raise ValueError(f"{name}: got shape {tuple(lens.shape)} dtype {lens.dtype}, expected an integer "
                             f"[batch] tensor with batch = {block_table.shape[0]} (block_table's rows)")
        if lens.device != block_table.device:
            raise ValueError(f"{name} is on {lens.device}, expected {block_table.device} like block_table")
    logical = torch.arange(block_table.shape[1], device=block_table.device)
    first = (seq_lens_before // block_size)[:, None]
    end = (seq_lens_after // block_size)[:, None]
    return block_table[(logical >= first) & (logical < end)]


def empty_block_repr(key_cache: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Allocate ``(kmin, kmax, kmean)``, each ``[num_blocks, num_kv_heads, head_dim]`` of ``dtype`` (default:
    key_cache's) on key_cache's device, uninitialised: fill blocks with :func:`update_block_repr`.

    With ``dtype=torch.float8_e4m3fn`` the tuple is ``(kmin, kmax, kmean, kscale)``, kscale
    ``[num_blocks, num_kv_heads]`` fp32: pass all four to :func:`update_block_repr` and kscale to the selection.
    """
    num_blocks, _, heads, head_dim = key_cache.shape
    return empty_block_repr_for(num_blocks, heads, head_dim, dtype or key_cache.dtype, key_cache.device)


def empty_block_repr_for(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """:func:`empty_block_repr` by sizes instead of a key cache (e.g. reprs for blocks kept off the device)."""
    reprs = tuple(torch.empty(num_blocks, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(3))
    if dtype != FP8:
        return reprs
    return (*reprs, torch.empty(num_blocks, num_kv_heads, dtype=torch.float32, device=device))
