"""Seed import path ``ucm.shared.trans.pinned_pool``: the PinnedMemoryPool."""
from ucm_store.pool import PinnedMemoryPool, PoolExhaustedError

__all__ = ["PinnedMemoryPool", "PoolExhaustedError"]
