"""TierLookup: where committed blocks are, for a process that only asks (vLLM's scheduler), without a store.

A :class:`~ucm_store.pipeline.UcmPipelineStore` owns a pinned pool (1 GiB touched at start by default), a Cache
tier in it and I/O and write-down threads. vLLM's scheduler runs in its own process (EngineCore) under
``vllm serve`` and never moves a byte: it asks which leading blocks of a prompt are stored, and where. This view
opens only the tiers below the Cache of a store config (Posix / NFS files, the object store, Mooncake lending no
memory), with no pool and no threads of its own; what the worker's Cache tier holds comes from the caller (the ids
the worker reported committed). Nothing is counted in the process's StatsMonitor: the caller reports its lookups
where the metrics are served.

Primitives: :meth:`TierLookup.lookup_prefix_tiers`, :meth:`TierLookup.close`, ``tiers``.
"""
from collections.abc import Container

from ucm_store.backends.base import Tier
from ucm_store.backends.cache import CacheTier
from ucm_store.pipeline import check_block_ids, block_key


class TierLookup:
    """A lookup-only view of the tiers below a store's Cache tier."""

    def __init__(self, tiers: list[Tier]):
        """``tiers``: the store's tiers below its Cache, in pipeline order (may be empty: a Cache-only store)."""
        assert not any(isinstance(tier, CacheTier) for tier in tiers), "a lookup view holds no Cache tier"
        self.tiers = tiers

    def lookup_prefix_tiers(self, block_ids: list[bytes], cached: Container[bytes] = ()) -> list[str]:
        """The tier name of each block of the leading run of hits, as ``UcmPipelineStore.lookup_prefix_tiers``
        names them: ``"Cache"`` for an id in ``cached`` (known to be in a Cache tier elsewhere, e.g. the worker's),
        else the first tier below holding it; the run ends at the first block found nowhere."""
        where = []
        for block_id in check_block_ids(block_ids):
            if block_id in cached:
                where.append(CacheTier.name)
                continue
            key = block_key(block_id)
            tier = next((tier for tier in self.tiers if tier.contains(key)), None)
            if tier is None:
                break
            where.append(tier.name)
        return where

    def close(self) -> None:
        """Release the tiers' resources (connections of remote tiers)."""
        for tier in self.tiers:
            tier.close()
