"""The tier interface every backend implements, and the errors a tier reports.

A tier holds whole, committed blocks under string keys (a hash of the block id, never the raw id). Writes are
atomic: ``put`` makes a complete block visible or nothing. Reads verify the block: a missing block raises
:class:`BlockMissing`, a torn or corrupt one :class:`BlockCorrupt` (and the tier drops it). Primitives:

* ``contains(key) -> bool``     committed and visible
* ``size(key) -> int | None``   payload bytes of a visible block (BlockCorrupt for a bad header)
* ``read(key, dst) -> None``    the whole block into ``dst`` (uint8 tensor of exactly ``size(key)`` bytes)
* ``put(key, src) -> bool``     publish a complete block (False: it was already there; immutable, so a no-op)
* ``put_many(items) -> list``   publish several blocks; per block None or the error that cost it (tiers that can
  share durability work between blocks override the one-by-one default)
* ``remove(key) -> None``       drop a block (corrupt, or evicted by the caller)
* ``close() -> None``
"""
import abc
from contextlib import contextmanager

import torch


class BlockMissing(KeyError):
    """The block is not in this tier (an expected miss)."""


class BlockCorrupt(IOError):
    """The block's bytes failed verification (truncated, checksum mismatch); the tier has dropped it."""


class Tier(abc.ABC):
    """One level of the store pipeline."""

    name: str = "tier"
    durable: bool = False

    @abc.abstractmethod
    def contains(self, key: str) -> bool:
        """True if a committed block is stored under ``key``."""

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """Payload bytes of the block under ``key``, or None when absent; BlockCorrupt (block dropped) when its
        header is unreadable."""

    @abc.abstractmethod
    def read(self, key: str, dst: torch.Tensor) -> None:
        """Copy the whole block into ``dst`` (1-D uint8, ``size(key)`` bytes); BlockMissing / BlockCorrupt."""

    @abc.abstractmethod
    def put(self, key: str, src: torch.Tensor) -> bool:
        """Atomically publish ``src`` (1-D uint8 CPU tensor) under ``key``; False if already present."""

    def put_many(self, items: list[tuple[str, torch.Tensor]]) -> list[Exception | None]:
        """Publish each ``(key, src)`` as :meth:`put` does; per item None (published, or already there) or the
        exception that cost that block alone."""
        results: list[Exception | None] = []
        for key, src in items:
            try:
                self.put(key, src)
                results.append(None)
            except Exception as exc:  # one block's failure never costs the others
                results.append(exc)
        return results

    @abc.abstractmethod
    def remove(self, key: str) -> None:
        """Drop the block under ``key`` if present."""

    def close(self) -> None:
        """Release the tier's resources."""

    @contextmanager
    def _drop_if_corrupt(self, key: str):
        """Around a check of block ``key``: a BlockCorrupt raised inside removes the block, then propagates."""
        try:
            yield
        except BlockCorrupt:
            self.remove(key)
            raise
