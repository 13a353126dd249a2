"""Prefetcher: block fetch jobs run by worker threads, with a bound on the pieces in flight.

``submit(job)`` queues a :class:`FetchJob` (first in, first out); a worker starts it only while the pieces of the
jobs already running plus its own stay within ``max_pending``, runs ``fetch(job)`` and marks it done.
``finish(job)`` is what the consumer calls when it needs the data: a job not started yet is cancelled (the
consumer then fetches what it still lacks itself), a running one is waited for. Workers only move bytes; every
decision about what to fetch is the submitter's.
"""
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)
QUEUED, RUNNING, DONE, CANCELLED = "queued", "running", "done", "cancelled"


@dataclass(eq=False)
class FetchJob:
    """Bring ``units`` (host ids, CPU int64) of ``layer`` into the device slots ``slots``; ``size`` pieces."""

    layer: int
    units: torch.Tensor
    slots: torch.Tensor
    after: object = None  # event the copy must wait for (the consumer's stream at submission), or None
    state: str = QUEUED
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def size(self) -> int:
        return self.units.numel()


class Prefetcher:
    """``workers`` threads running ``fetch(job)``; at most ``max_pending`` pieces in flight at once."""

    def __init__(self, workers: int, max_pending: int, fetch: Callable[[FetchJob], None]):
        if workers < 1 or max_pending < 1:
            raise ValueError(f"workers={workers}, max_pending={max_pending}: both must be >= 1")
        self.max_pending = max_pending
        self._fetch = fetch
        self._queue: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self.in_flight = 0
        self.peak_in_flight = 0
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"ucm-gsa-prefetch-{i}")
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: FetchJob) -> None:
        """Queue ``job`` (at most ``max_pending`` pieces)."""
        if not 0 < job.size <= self.max_pending:
            raise ValueError(f"job of {job.size} pieces: expected 1..{self.max_pending} (max_pending)")
        self._queue.put(job)

    def finish(self, job: FetchJob) -> bool:
        """Cancel ``job`` if it has not started, else wait for it; True when its data arrived."""
        with self._cond:
            if job.state == QUEUED:
                job.state = CANCELLED
                self._cond.notify_all()
                return False
        job.done.wait()
        return job.error is None

    def close(self) -> None:
        """Stop the workers after the jobs already queued."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._start(job):
                self._run(job)

    def _start(self, job: FetchJob) -> bool:
        with self._cond:
            while job.state == QUEUED and self.in_flight + job.size > self.max_pending:
                self._cond.wait()
            if job.state == CANCELLED:
                job.done.set()
                return False
            job.state = RUNNING
            self.in_flight += job.size
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return True

    def _run(self, job: FetchJob) -> None:
        try:
            self._fetch(job)
        except Exception as exc:  # reported through finish(); the consumer fetches the pieces itself
            logger.error("prefetch of %d pieces of layer %d failed: %s", job.size, job.layer, exc)
            job.error = exc
        finally:
            with self._cond:
                self.in_flight -= job.size
                job.state = DONE
                self._cond.notify_all()
            job.done.set()
