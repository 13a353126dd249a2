"""The front of a pipeline: how committed blocks enter its top tier and how loads reach them.

* :class:`CacheFront` (``store_pipeline: "Cache|..."``): a committed block is adopted by the Cache tier in pinned
  DRAM (no copy) and written down to the tiers below (``ucm_store.writedown``); loads copy from the Cache tier,
  promoting blocks found below into it once (``ucm_store.promotion``); prefetch and in-place holds are possible.
* :class:`DirectFront` (no Cache tier): a committed block is written into the top tier by the store's I/O workers
  and its buffer freed; a load reads the whole block from the first tier holding it into a pool buffer.

The store (``ucm_store.pipeline``) keeps the contract, the staging of dumps and the lookups, and asks its front
for the rest, so neither of them branches on whether there is a Cache tier.
"""
import contextlib
import logging
from concurrent.futures import Executor, Future

import torch

from ucm_store.backends.base import BlockCorrupt, BlockMissing, Tier
from ucm_store.backends.cache import CacheTier
from ucm_store.metrics import StatsMonitor
from ucm_store.pool import PinnedMemoryPool, PoolExhaustedError
from ucm_store.promotion import Promoter, missing_message, read_whole
from ucm_store.writedown import WRITEBACK_THREADS, Item, WriteDown

logger = logging.getLogger(__name__)


class DirectFront:
    """A pipeline without a Cache tier (see the module doc)."""

    cache: CacheTier | None = None

    def __init__(self, tiers: list[Tier], pool: PinnedMemoryPool, io: Executor, monitor: StatsMonitor, *,
                 alloc_timeout: float):
        self.tiers, self.pool, self.io, self.monitor, self.alloc_timeout = tiers, pool, io, monitor, alloc_timeout
        self.write_down = WriteDown(None, [], monitor, threads=0, depth=1)  # nothing is ever written down

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A buffer for a staged block."""
        return self.allocate_uncached(nbytes)

    def allocate_uncached(self, nbytes: int) -> torch.Tensor:
        """A pool buffer outside the Cache tier, waiting up to ``alloc_timeout`` s for room (PoolExhaustedError)."""
        return self.pool.allocate(nbytes, timeout=self.alloc_timeout)

    def commit_all(self, commit_one, block_ids: list[bytes], flags: list[bool], write_through: bool) -> list[bool]:
        """``commit_one(block_id, flag, inline)`` for each block on the I/O workers (each is a tier write)."""
        results = [self.io.submit(commit_one, b, f, None) for b, f in zip(block_ids, flags)]
        return [r.result() for r in results]

    def publish(self, block_id: bytes, key: str, buf: torch.Tensor, inline: list[Item] | None) -> bool:
        """Write the assembled block into the top tier; its buffer goes back to the pool."""
        top = self.tiers[0]
        try:
            top.put(key, buf)
            return True
        except (OSError, PoolExhaustedError) as exc:
            logger.error("commit of block %s to %s failed: %s", block_id.hex(), top.name, exc)
            return False
        finally:
            self.pool.release(buf)

    def copy_cached(self, key: str, offset: int, part: torch.Tensor) -> bool:
        """Copy ``part`` from DRAM on the calling thread when the block is there: never without a Cache tier."""
        return False

    def load_part(self, key: str, offset: int, part: torch.Tensor) -> None:
        """Bytes ``[offset, offset + part)`` of block ``key`` into ``part`` (an I/O worker's load)."""
        self.load_uncached(key, offset, part)

    @contextlib.contextmanager
    def hold(self, keys: list[str]):
        """The Cache tier's buffers of ``keys``, held: none here."""
        yield [None] * len(keys)

    def promote(self, key: str) -> Future:
        raise ValueError(f"promote: store_pipeline {'|'.join(t.name for t in self.tiers)!r} has no Cache tier")

    def prefetch(self, keys: list[str]) -> None:
        """Nothing to prefetch into without a Cache tier."""

    def load_uncached(self, key: str, offset: int, part: torch.Tensor) -> None:
        """Read the whole block from the first tier holding it intact into a pool buffer, then copy the range."""
        causes = []
        for tier in self.tiers:
            try:
                buf = read_whole(tier, key, self.allocate_uncached, self.pool)
            except (BlockMissing, BlockCorrupt) as exc:
                causes.append(f"{tier.name}: {exc}")
                continue
            try:
                copy_range(key, buf, offset, part)
                return
            finally:
                self.pool.release(buf)
        raise BlockMissing(missing_message(self.tiers, key, causes))


class CacheFront(DirectFront):
    """A pipeline whose top tier is a Cache tier (see the module doc)."""

    def __init__(self, tiers: list[Tier], pool: PinnedMemoryPool, io: Executor, monitor: StatsMonitor, *,
                 alloc_timeout: float, io_workers: int, writeback_depth: int, prefetch_depth: int):
        super().__init__(tiers, pool, io, monitor, alloc_timeout=alloc_timeout)
        self.cache = tiers[0]
        self.write_down = WriteDown(self.cache, tiers[1:], monitor, depth=writeback_depth,
                                    threads=min(io_workers, WRITEBACK_THREADS) if len(tiers) > 1 else 0)
        self.promoter = Promoter(tiers, pool, io, depth=prefetch_depth)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A buffer the Cache tier will adopt (it may evict unpinned blocks to make room)."""
        return self.cache.allocate(nbytes)

    def commit_all(self, commit_one, block_ids: list[bytes], flags: list[bool], write_through: bool) -> list[bool]:
        """Publishing into DRAM is cheap: on the calling thread, no hand-off per block; with ``write_through``
        the published blocks are also written down here before returning."""
        inline: list[Item] | None = [] if write_through and self.write_down.active else None
        results = [commit_one(b, f, inline) for b, f in zip(block_ids, flags)]
        self.write_down.write_now(inline or [])
        return results

    def publish(self, block_id: bytes, key: str, buf: torch.Tensor, inline: list[Item] | None) -> bool:
        """The Cache tier adopts the buffer (pinned until written down); its write-down is queued, or appended to
        ``inline`` for the caller."""
        if not self.cache.adopt(key, buf, pinned=self.write_down.active):
            self.pool.release(buf)
            return True
        if inline is not None:
            inline.append((block_id, key))
        elif self.write_down.active:
            self.write_down.enqueue((block_id, key))
        return True

    def copy_cached(self, key: str, offset: int, part: torch.Tensor) -> bool:
        """Copy from the Cache tier if the block is there (False otherwise; a range error fails in a worker)."""
        try:
            with self.cache.hold(key) as buf:
                if offset + part.numel() > buf.numel():
                    return False
                with self.monitor.transfer("load") as result:
                    part.copy_(buf[offset:offset + part.numel()])
                    result["bytes"], result["blocks"] = part.numel(), 1
                return True
        except BlockMissing:
            return False

    def load_part(self, key: str, offset: int, part: torch.Tensor) -> None:
        if not self._load_via_cache(key, offset, part):
            self.load_uncached(key, offset, part)

    @contextlib.contextmanager
    def hold(self, keys: list[str]):
        """The Cache tier's buffers of ``keys`` (None where absent), kept from eviction; counted as loads."""
        with self.cache.hold_many(keys) as buffers:
            with self.monitor.transfer("load") as result:
                yield buffers
                held = [b for b in buffers if b is not None]
                result["bytes"], result["blocks"] = sum(b.numel() for b in held), len(held)

    def promote(self, key: str) -> Future:
        return self.io.submit(self.promoter.fetch_into_cache, key)

    def prefetch(self, keys: list[str]) -> None:
        if self.promoter.depth:
            self.promoter.prefetch(keys)

    def _load_via_cache(self, key: str, offset: int, part: torch.Tensor, attempts: int = 3) -> bool:
        """Copy from the Cache tier, promoting the block first if needed; False if it keeps being evicted."""
        for _ in range(attempts):
            try:
                with self.cache.hold(key) as buf:
                    copy_range(key, buf, offset, part)
                    return True
            except BlockMissing:
                self.promoter.fetch_into_cache(key)
        return False


def copy_range(key: str, buf: torch.Tensor, offset: int, part: torch.Tensor) -> None:
    """Bytes ``[offset, offset + part)`` of block ``key``'s whole buffer into ``part`` (ValueError past its end)."""
    end = offset + part.numel()
    if end > buf.numel():
        raise ValueError(f"block {key} holds {buf.numel()} bytes; bytes [{offset}, {end}) were asked for")
    part.copy_(buf[offset:end])
