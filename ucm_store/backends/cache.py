"""Cache tier: committed blocks in pinned DRAM buffers from the PinnedMemoryPool, least recently used evicted.

At most ``cache_capacity`` blocks are held. A block is pinned (never evicted) while a reader holds it
(:meth:`CacheTier.hold`) or while its write-down to a lower tier is pending (:meth:`CacheTier.pin`). When the
pool has no room for a new buffer, :meth:`CacheTier.allocate` evicts unpinned blocks until it fits.
"""
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager

import torch

from ucm_store.backends.base import BlockMissing, Tier
from ucm_store.pool import STORE_WAIT_SECONDS, PinnedMemoryPool, PoolExhaustedError


class _Entry:
    __slots__ = ("buf", "refs")

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.refs = 0


class CacheTier(Tier):
    """Pinned-DRAM block cache with LRU eviction and reference pinning."""

    name = "Cache"

    def __init__(self, capacity: int, pool: PinnedMemoryPool, alloc_timeout: float = STORE_WAIT_SECONDS):
        self.capacity = capacity
        self.pool = pool
        self.alloc_timeout = alloc_timeout
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def size(self, key: str) -> int | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.buf.numel()

    def read(self, key: str, dst: torch.Tensor) -> None:
        with self.hold(key) as buf:
            dst.copy_(buf)

    @contextmanager
    def hold(self, key: str):
        """Yield the block's buffer, pinned against eviction for the duration; BlockMissing if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise BlockMissing(key)
            self._entries.move_to_end(key)
            entry.refs += 1
        try:
            yield entry.buf
        finally:
            self._unref(key, entry)

    @contextmanager
    def hold_many(self, keys: list[str]):
        """Yield each key's buffer (None where absent), all pinned against eviction for the duration: :meth:`hold`
        for many blocks under one lock acquisition each way."""
        with self._lock:
            entries = [self._entries.get(key) for key in keys]
            for key, entry in zip(keys, entries):
                if entry is not None:
                    self._entries.move_to_end(key)
                    entry.refs += 1
        try:
            yield [None if entry is None else entry.buf for entry in entries]
        finally:
            with self._lock:
                for entry in entries:
                    if entry is not None:
                        entry.refs -= 1
                victims = self._pick_victims(len(self._entries) - self.capacity)
            self._free(victims)

    def pin(self, key: str) -> None:
        """Keep ``key`` from eviction until :meth:`unpin` (e.g. while its write-down is pending)."""
        with self._lock:
            self._entries[key].refs += 1

    def unpin(self, key: str) -> None:
        """Undo one :meth:`pin`."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None:
            self._unref(key, entry)

    def put(self, key: str, src: torch.Tensor) -> bool:
        if self.contains(key):
            return False
        buf = self.allocate(src.numel())
        buf.copy_(src)
        if not self.adopt(key, buf):
            self.pool.release(buf)
            return False
        return True

    def adopt(self, key: str, buf: torch.Tensor, pinned: bool = False) -> bool:
        """Publish a pool buffer as the block ``key`` without copying (``pinned``: also :meth:`pin` it);
        False (buffer not taken) if ``key`` is already present."""
        with self._lock:
            if key in self._entries:
                return False
            self._entries[key] = _Entry(buf)
            self._entries[key].refs = int(pinned)
            victims = self._pick_victims(len(self._entries) - self.capacity)
        self._free(victims)
        return True

    def remove(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.refs:
                return
            del self._entries[key]
        self.pool.release(entry.buf)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A pool buffer of ``nbytes``, evicting unpinned blocks while the pool is full (PoolExhaustedError
        after ``alloc_timeout`` s when every cached block is pinned)."""
        deadline = time.monotonic() + self.alloc_timeout
        while True:
            try:
                return self.pool.allocate(nbytes, timeout=0)
            except PoolExhaustedError:
                pass
            with self._lock:
                victims = self._pick_victims(1)
            if victims:
                self._free(victims)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolExhaustedError(f"Cache tier: no room for a {nbytes}-byte block in the pinned pool "
                                         f"after {self.alloc_timeout} s; every cached block is in use")
            try:
                return self.pool.allocate(nbytes, timeout=min(0.05, remaining))
            except PoolExhaustedError:
                continue

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            self.pool.release(entry.buf)

    def _pick_victims(self, count: int) -> list[_Entry]:
        """Remove up to ``count`` least recently used unpinned entries (caller holds the lock)."""
        if count <= 0:
            return []
        keys = []
        for key, entry in self._entries.items():
            if len(keys) >= count:
                break
            if entry.refs == 0:
                keys.append(key)
        victims = [self._entries.pop(key) for key in keys]
        self.evictions += len(victims)
        return victims

    def _free(self, victims: list[_Entry]) -> None:
        for entry in victims:
            self.pool.release(entry.buf)

    def _unref(self, key: str, entry: _Entry) -> None:
        with self._lock:
            entry.refs -= 1
            victims = self._pick_victims(len(self._entries) - self.capacity)
        self._free(victims)
