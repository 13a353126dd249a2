"""Availability handling shared by the remote tiers (DS3FS, Mooncake).

* :class:`RemoteUnavailable`   the error a remote request raises when its server failed, timed out or is skipped
* :class:`RemoteGate`          bounds the requests in flight and skips a server for a while after it failed:
  ``request(what)`` (a context manager around one call), ``failed(what, cause)``, ``succeeded()``
"""
import logging
import threading
import time
from contextlib import contextmanager


class RemoteUnavailable(OSError):
    """A remote tier's server failed a request, did not answer in time, or is skipped after a recent failure."""


class RemoteGate:
    """The guard around a remote tier's requests: at most ``max_concurrent`` at once; after a failure the server
    counts as down for ``retry_interval`` seconds, during which requests fail at once (no waiting on a dead server).
    Outages are reported on ``log``, the tier's logger: a warning when one starts, an info line when it ends."""

    def __init__(self, tier_name: str, *, max_concurrent: int, timeout: float, retry_interval: float,
                 log: logging.Logger):
        self.tier_name = tier_name
        self.log = log
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    @contextmanager
    def request(self, what: str):
        """Hold a request slot around one remote call; RemoteUnavailable while the server is down (checked again
        once a slot frees: the requests ahead may just have failed) or no slot frees within ``timeout``."""
        self._skip_if_down(what)
        if not self._slots.acquire(timeout=self.timeout):
            raise RemoteUnavailable(f"{self.tier_name} {what}: no request slot free within {self.timeout} s")
        try:
            self._skip_if_down(what)
            yield
        finally:
            self._slots.release()

    def _skip_if_down(self, what: str) -> None:
        wait = self._down_until - time.monotonic()
        if wait > 0:
            raise RemoteUnavailable(f"{self.tier_name} {what} skipped: server unreachable, next try in {wait:.1f} s")

    def failed(self, what: str, cause: str) -> RemoteUnavailable:
        """Mark the server down for ``retry_interval`` s (a warning at the start of an outage); the error to raise."""
        with self._lock:
            first = not self._down
            self._down = True
            self._down_until = time.monotonic() + self.retry_interval
        if first:
            self.log.warning("%s tier: %s failed (%s); answering misses, retrying every %.1f s", self.tier_name, what,
                             cause, self.retry_interval)
        return RemoteUnavailable(f"{self.tier_name} {what} failed: {cause}")

    def succeeded(self) -> None:
        """Note an answered request (ends an outage)."""
        if not self._down:
            return
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            self.log.info("%s tier: server reachable again", self.tier_name)
