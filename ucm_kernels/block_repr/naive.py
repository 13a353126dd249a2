"""Plain-torch reference of the block representations (fp32 math)."""
import torch


def naive_update_block_repr(key_cache: torch.Tensor, block_ids: torch.Tensor, kmin: torch.Tensor,
                            kmax: torch.Tensor, kmean: torch.Tensor) -> None:
    """Reference of :func:`ucm_kernels.block_repr.update_block_repr`, same arguments and semantics."""
    ids = block_ids.long()
    ids = ids[(ids >= 0) & (ids < key_cache.shape[0])]
    keys = key_cache[ids].float()  # [n, block_size, num_kv_heads, head_dim]
    kmin[ids] = keys.amin(dim=1).to(kmin.dtype)
    kmax[ids] = keys.amax(dim=1).to(kmax.dtype)
    kmean[ids] = keys.mean(dim=1).to(kmean.dtype)
