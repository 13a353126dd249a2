"""Tiered KV block store: config, hashing, pinned pool, transport, backends, pipeline, factory, metrics.

The names below are the store's seam for other packages (GSA's offload mode keeps its host KV in a Cache tier):
a :class:`CacheTier` over a :class:`PinnedMemoryPool` adopts caller-filled buffers under :func:`block_key` keys.
"""
from ucm_store.backends.cache import CacheTier
from ucm_store.pipeline import block_key
from ucm_store.pool import PinnedMemoryPool

__all__ = ["CacheTier", "PinnedMemoryPool", "block_key"]
