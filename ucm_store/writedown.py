"""Write-down: committed blocks copied from the Cache tier to every lower tier by background threads.

A block committed into the Cache tier is pinned there and queued (``enqueue``); a writer thread takes the queued
blocks in batches (at most WRITE_DOWN_BATCH blocks and about WRITE_DOWN_BATCH_BYTES), puts them into each lower
tier (``put_many``: a Posix tier syncs a batch at once) and unpins them. A failure costs only its block's lower
copies (counted and logged), never the writer or the other blocks. ``write_now(batch)`` does the same on the
caller's thread (write-through commits); ``flush`` waits until the queue is empty.
"""
import atexit
import contextlib
import logging
import os
import queue
import threading
import weakref

from ucm_store.backends.base import BlockMissing, Tier
from ucm_store.backends.cache import CacheTier
from ucm_store.metrics import StatsMonitor

logger = logging.getLogger(__name__)
# Threads writing committed blocks down to the lower tiers. Few on purpose: write-down is background work that
# must not starve loads on small hosts (on 2 cores, 4 writers made a 16 MB Cache-tier load 3-5x slower).
WRITEBACK_THREADS = 2
WRITE_DOWN_BATCH = 64  # queued blocks a writer publishes together (Posix: one durability round for all of them)
WRITE_DOWN_BATCH_BYTES = 8 << 20  # ... and their bytes at most: nothing of a batch is visible before all is synced

Item = tuple[bytes, str]  # (block id, storage key)
_running: "weakref.WeakSet[WriteDown]" = weakref.WeakSet()  # kept alive by their threads, not by their store


@atexit.register
def drain_all() -> None:
    """Finish the queued write-downs of this process (every store's, closed or dropped without close). Runs at
    interpreter exit, so nothing committed is lost; call it yourself before leaving through ``os._exit``, which
    skips exit handlers."""
    for write_down in list(_running):
        write_down.flush()


class WriteDown:
    """The queue of blocks to write down from ``cache`` to ``lower`` and its ``threads`` writers (none: nothing
    is ever queued; ``active`` is False)."""

    def __init__(self, cache: CacheTier | None, lower: list[Tier], monitor: StatsMonitor, *, threads: int,
                 depth: int):
        self.cache, self.lower, self.monitor = cache, lower, monitor
        self.failures = 0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"ucm-writeback-{i}")
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()
        if threads:
            _running.add(self)

    @property
    def active(self) -> bool:
        """Blocks committed into the Cache tier are written down (and stay pinned until they are)."""
        return bool(self._threads)

    @property
    def pending(self) -> int:
        """Queued blocks not written down yet."""
        return self._queue.unfinished_tasks

    def enqueue(self, item: Item) -> None:
        """Queue a pinned Cache block (waits while ``depth`` blocks are queued: backpressure)."""
        self._queue.put(item)

    def write_now(self, items: list[Item]) -> None:
        """Write these pinned Cache blocks down on the calling thread, in batches."""
        for start in range(0, len(items), WRITE_DOWN_BATCH):
            self._write(items[start:start + WRITE_DOWN_BATCH])

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued block has been written down (TimeoutError after ``timeout`` s)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        if not done.wait(timeout):
            raise TimeoutError(f"write-down not finished after {timeout} s ({self._queue.qsize()} queued)")

    def close(self) -> None:
        """Finish the queue, then stop the writers."""
        _running.discard(self)
        self.flush()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _loop(self) -> None:
        _lower_thread_priority()
        while True:
            batch, stop = self._take()
            try:
                if batch:
                    self._write(batch)
            finally:
                for _ in range(len(batch) + stop):
                    self._queue.task_done()
            if stop:
                return

    def _take(self) -> tuple[list[Item], bool]:
        """The next queued blocks: wait for one, then take those already queued (at most WRITE_DOWN_BATCH blocks and
        about WRITE_DOWN_BATCH_BYTES); and whether this writer's stop sentinel (None) came."""
        batch, nbytes = [], 0
        item = self._queue.get()
        while item is not None:
            batch.append(item)
            nbytes += self.cache.size(item[1]) or 0
            if len(batch) == WRITE_DOWN_BATCH or nbytes >= WRITE_DOWN_BATCH_BYTES:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _write(self, batch: list[Item]) -> None:
        """Publish a batch of pinned Cache blocks to every lower tier, then unpin them."""
        try:
            errors = self._publish_below(batch)
        except Exception as exc:  # not a tier's error (those come back per block): the whole batch failed
            errors = [exc] * len(batch)
        for (block_id, key), error in zip(batch, errors):
            if error is not None:
                self.failures += 1
                self.monitor.record_writedown_failure()
                logger.error("write-down of block %s failed: %s", block_id.hex(), error)
            self.cache.unpin(key)

    def _publish_below(self, batch: list[Item]) -> list[Exception | None]:
        """Put the batch's Cache buffers into every lower tier (a block failing in one tier skips the next ones);
        per block None or the error that cost it."""
        errors: list[Exception | None] = [None] * len(batch)
        with contextlib.ExitStack() as held:
            bufs = []
            for i, (_, key) in enumerate(batch):
                try:
                    bufs.append(held.enter_context(self.cache.hold(key)))
                except BlockMissing as exc:
                    bufs.append(None)
                    errors[i] = exc
            for tier in self.lower:
                todo = [i for i, error in enumerate(errors) if error is None]
                try:
                    results = tier.put_many([(batch[i][1], bufs[i]) for i in todo])
                except Exception as exc:
                    results = [exc] * len(todo)
                for i, error in zip(todo, results):
                    errors[i] = error
        return errors


def _lower_thread_priority() -> None:
    """Run this thread at the lowest CPU priority: write-down is background work that must not slow the caller
    (serving on the same cores). Linux sets nice values per thread; elsewhere this is a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass
