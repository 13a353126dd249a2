"""Where block representations live: their tensors beside the cache, and the blocks a step must fill."""
import torch

from .._utils import check_positive_int
from .triton import FP8


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
    check_positive_int("block_size", block_size)
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
