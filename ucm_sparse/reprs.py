"""Block representations kept by physical block id, recomputed only for blocks whose keys changed.

When something other than GSA writes the KV cache (vLLM's forward pass, a KV connector loading blocks from the
store, a prefix-cache hit reusing a block), GSA cannot know which blocks filled or were replaced. This cache stores,
next to each block's summaries (kmin, kmax, kmean; kscale when fp8), a fingerprint: the keys of the block's first
and last token. Before a selection, :meth:`BlockReprCache.refresh` compares the fingerprints of the blocks about to
be scored and recomputes the representations of those that differ (or never had one). Two blocks with equal first
and last keys but different keys in between would keep a stale representation: that costs selection quality, never
attention correctness (attention reads the blocks themselves).
"""
import torch

from . import ops
from .config import GSAConfig


class BlockReprCache:
    """Block summaries (as :func:`ops.empty_reprs` makes them for ``config``) and key fingerprints of every
    physical block of one layer's cache ``[num_blocks, block_size, num_kv_heads, head_dim]``."""

    def __init__(self, key_cache: torch.Tensor, config: GSAConfig):
        num_blocks, _, heads, head_dim = key_cache.shape
        self.reprs = ops.empty_reprs(num_blocks, heads, head_dim, key_cache.dtype, config, key_cache.device)
        self.fingerprints = torch.full((num_blocks, 2, heads, head_dim), float("nan"), dtype=key_cache.dtype,
                                       device=key_cache.device)
        self.recomputed = 0  # blocks whose representation was (re)computed so far

    def refresh(self, backend: str, key_cache: torch.Tensor, blocks: torch.Tensor) -> tuple:
        """Bring the representations of ``blocks`` (full physical blocks, int tensor) up to date; return them."""
        if key_cache.shape[0] != self.fingerprints.shape[0]:
            raise ValueError(f"key_cache: {key_cache.shape[0]} blocks, this cache was made for "
                             f"{self.fingerprints.shape[0]}")
        ids = blocks.long()
        now = key_cache[ids][:, [0, -1]]  # [n, 2, heads, head_dim]
        stale = ids[(now != self.fingerprints[ids]).flatten(1).any(dim=1)]
        if stale.numel():
            ops.update_reprs(backend, key_cache, stale, self.reprs)
            self.fingerprints[stale] = key_cache[stale][:, [0, -1]]
            self.recomputed += stale.numel()
        return self.reprs
