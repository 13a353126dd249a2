"""UcmConnectorFactory: a store from a config (the tuning guide's ``create_connector(config, local_rank)``), or a
lookup-only view of its tiers below the Cache (``create_lookup(config)``: no pinned pool, no threads)."""
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ucm_store.backends.base import Tier
from ucm_store.backends.cache import CacheTier
from ucm_store.backends.posix import NFSTier, PosixTier
from ucm_store.config import MiB, StoreConfig, load_store_config
from ucm_store.lookup import TierLookup
from ucm_store.pipeline import UcmPipelineStore
from ucm_store.pool import PinnedMemoryPool

_DISK_TIERS = {"Posix": PosixTier, "NFS": NFSTier}


class UcmConnectorFactory:
    """Builds stores from configs."""

    @staticmethod
    def create_connector(config: Mapping | str | Path | StoreConfig, local_rank: int = 0) -> UcmPipelineStore:
        """A store for ``config`` (any form ``ucm_store.config`` accepts, or a StoreConfig) on ``local_rank``."""
        if not isinstance(local_rank, int) or local_rank < 0:
            raise ValueError(f"local_rank: expected an int >= 0, got {local_rank!r}")
        store_config = config if isinstance(config, StoreConfig) else load_store_config(config)
        pool = PinnedMemoryPool.configure(store_config.pinned_pool_size, store_config.max_pinned_size)
        tiers: list[Tier] = []
        for name in store_config.tiers:
            tiers.append(_build_tier(name, store_config, pool))
        return UcmPipelineStore(tiers, pool, io_workers=store_config.io_workers,
                                writeback_depth=store_config.buffer_number,
                                prefetch_depth=store_config.prefetch_depth if store_config.prefetch_enabled else 0)

    @staticmethod
    def create_lookup(config: Mapping | str | Path | StoreConfig) -> TierLookup:
        """A lookup-only view of ``config``'s tiers below the Cache (for vLLM's scheduler process): no pinned pool,
        no Cache tier, no write-down or I/O threads (a remote tier keeps the threads that bound its requests' time);
        a Mooncake tier lends no memory to the pool from it."""
        store_config = config if isinstance(config, StoreConfig) else load_store_config(config)
        quiet = dataclasses.replace(store_config, mooncake_global_segment_size=0, mooncake_local_buffer_size=MiB)
        return TierLookup([_build_tier(name, quiet, None) for name in store_config.tiers if name != "Cache"])


def _build_tier(name: str, config: StoreConfig, pool: PinnedMemoryPool | None) -> Tier:
    """Tier ``name`` of ``config.store_pipeline``, from its slice of the keys (a Cache tier keeps its blocks in
    ``pool``)."""
    settings = config.tier_settings(name)  # ValueError for a name that is not a tier
    if name == "Cache":
        return CacheTier(settings.cache_capacity, pool)
    if name in _DISK_TIERS:
        if not settings.storage_backends:
            raise ValueError(f"storage_backends: the {name} tier of store_pipeline {config.store_pipeline!r} "
                             "needs at least one directory; none given")
        return _DISK_TIERS[name](settings.storage_backends, path_strategy=settings.path_strategy,
                                 use_direct_io=settings.use_direct_io, capacity_bytes=settings.storage_capacity)
    if name == "DS3FS":
        from ucm_store.backends.s3 import S3Tier  # imported on use: needs obstore

        return S3Tier.from_settings(settings)
    if name == "Mooncake":
        if not settings.mooncake_master:  # a config error is named before a missing package is
            raise ValueError("mooncake_master: the Mooncake tier needs the master's host:port; none given")
        from ucm_store.backends.mooncake import MooncakeTier  # imported on use: needs mooncake and its libraries

        return MooncakeTier.from_settings(settings)
    raise AssertionError(f"tier {name!r} has settings but no builder")  # TIER_NAMES and this function disagree
