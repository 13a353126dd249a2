"""Promotion: blocks read from a lower tier into the Cache tier, once however many callers want them.

``fetch_into_cache(key)`` reads (and verifies) a block from the first lower tier holding it into the Cache tier;
concurrent callers of the same block share that one read. ``prefetch(keys)`` queues such reads on the store's I/O
workers (at most ``depth`` blocks per call) without waiting.
"""
import logging
import threading
from concurrent.futures import Executor, Future

import torch

from ucm_store.backends.base import BlockCorrupt, BlockMissing, Tier
from ucm_store.pool import PinnedMemoryPool, PoolExhaustedError

logger = logging.getLogger(__name__)


class Promoter:
    """Reads blocks from ``tiers[1:]`` into the Cache tier ``tiers[0]``; ``depth`` blocks prefetched per call."""

    def __init__(self, tiers: list[Tier], pool: PinnedMemoryPool, io: Executor, *, depth: int):
        self.tiers, self.cache, self.pool, self.io, self.depth = tiers, tiers[0], pool, io, depth
        self._fetching: dict[str, Future] = {}
        self._lock = threading.Lock()

    def fetch_into_cache(self, key: str) -> None:
        """Make sure ``key`` is in the Cache tier, reading it from a lower tier once for all concurrent callers;
        BlockMissing naming each tier's cause when no tier has it intact."""
        if self.cache.contains(key):
            return
        with self._lock:
            future = self._fetching.get(key)
            owner = future is None
            if owner:
                future = self._fetching[key] = Future()
        if owner:
            try:
                self._promote(key)
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._lock:
                    del self._fetching[key]
        future.result()

    def prefetch(self, keys: list[str]) -> None:
        """Queue the promotion of the first ``depth`` of ``keys`` (blocks found below the Cache tier)."""
        for key in keys[:self.depth]:
            self.io.submit(self._prefetch_one, key)

    def _promote(self, key: str) -> None:
        causes = []
        for tier in self.tiers[1:]:
            try:
                buf = read_whole(tier, key, self.cache.allocate, self.pool)
            except (BlockMissing, BlockCorrupt) as exc:
                causes.append(f"{tier.name}: {exc}")
                continue
            if not self.cache.adopt(key, buf):
                self.pool.release(buf)
            return
        if not self.cache.contains(key):
            raise BlockMissing(missing_message(self.tiers, key, causes))

    @torch.inference_mode()
    def _prefetch_one(self, key: str) -> None:
        try:
            self.fetch_into_cache(key)
        except (BlockMissing, OSError, PoolExhaustedError) as exc:
            logger.info("prefetch of block %s skipped: %s", key, exc)


def read_whole(tier: Tier, key: str, allocate, pool: PinnedMemoryPool) -> torch.Tensor:
    """The whole block ``key`` from ``tier`` in a new pool buffer (from ``allocate(nbytes)``, given back to ``pool``
    on failure); BlockMissing / BlockCorrupt."""
    size = tier.size(key)
    if size is None:
        raise BlockMissing("absent")
    buf = allocate(size)
    try:
        tier.read(key, buf)
    except BaseException:
        pool.release(buf)
        raise
    return buf


def missing_message(tiers: list[Tier], key: str, causes: list[str]) -> str:
    """Why block ``key`` could not be read: the pipeline's tiers and each cause that is not a plain absence."""
    pipeline = "|".join(t.name for t in tiers)
    found = "; ".join(c for c in causes if not c.endswith("'absent'"))
    return f"block {key} is in no tier of {pipeline}" + (f" ({found})" if found else "")
