"""PinnedMemoryPool: one process-wide pool of pinned host memory handed out as byte buffers.

Memory comes in arenas: ``pinned_pool_size`` bytes reserved at start, further arenas added on demand until
``max_pinned_size``; never more. Each arena is split into 4 KiB pages tracked by a byte map (1 = in use);
finding a free run and marking it are Numba functions over that map (each with a plain-Python twin for the
tests). When no run is free, :meth:`PinnedMemoryPool.allocate` waits for a release up to ``timeout`` seconds,
then raises :class:`PoolExhaustedError`. Buffers are pinned (page-locked, DMA-able) where CUDA is available and
ordinary memory with the same API where it is not; the first arena's pages are then touched at start (pinning
populates them), so that saves do not pay a page fault per 4 KiB.
"""
import threading
import time
import weakref

import numpy as np
import torch

from ucm_store.lazyjit import lazy_njit
from ucm_store.process_wide import ProcessWide

PAGE_BYTES = 4096
DEFAULT_POOL_BYTES = 1 << 30
DEFAULT_MAX_BYTES = 4 << 30
STORE_WAIT_SECONDS = 30.0  # how long the store's own allocations wait for a full pool (backpressure), then fail


class PoolExhaustedError(RuntimeError):
    """No free run of pages appeared within the allocation's timeout."""


@lazy_njit(cache=True, nogil=True)
def find_free_run(used, npages, hint):
    """First index >= ``hint`` (wrapping to 0) of ``npages`` free pages in byte map ``used``; -1 if none."""
    total = used.shape[0]
    for origin in (hint, 0):
        run = 0
        stop = total if origin == hint else min(hint + npages - 1, total)
        for i in range(origin, stop):
            run = 0 if used[i] else run + 1
            if run == npages:
                return i - npages + 1
    return -1


@lazy_njit(cache=True, nogil=True)
def mark_run(used, start, npages, value):
    """Set ``used[start:start + npages]`` to ``value`` (1 taken, 0 free)."""
    for i in range(start, start + npages):
        used[i] = value


def find_free_run_reference(used: list[int], npages: int, hint: int) -> int:
    """Plain-Python twin of :func:`find_free_run`."""
    for origin, stop in ((hint, len(used)), (0, min(hint + npages - 1, len(used)))):
        run = 0
        for i in range(origin, stop):
            run = 0 if used[i] else run + 1
            if run == npages:
                return i - npages + 1
    return -1


class _Arena:
    """One contiguous host allocation, 4 KiB aligned, and its page map."""

    def __init__(self, nbytes: int, pinned: bool, reserve: bool = False):
        """``reserve``: touch every page now (pinned memory always is), so that first writes into it do not take
        a page fault each (about 55 us per 128 KiB block on the 2-core machine, a third of a CPU save)."""
        self.memory = page_locked_buffer(nbytes, pinned)
        if reserve and not pinned:
            self.memory.fill_(0)
        self.used = np.zeros(nbytes // PAGE_BYTES, dtype=np.uint8)
        self.hint = 0

    @property
    def nbytes(self) -> int:
        return self.memory.numel()

    def take(self, npages: int) -> int:
        """Start page of a newly taken run of ``npages``, or -1."""
        start = find_free_run(self.used, npages, self.hint)
        if start >= 0:
            mark_run(self.used, start, npages, 1)
            self.hint = (start + npages) % len(self.used)
        return start


class PinnedMemoryPool(ProcessWide):
    """Process-wide pinned host memory pool (``get_instance()``: made with the default sizes on first use unless
    :meth:`configure` ran); thread-safe."""

    def __init__(self, pinned_pool_size: int = DEFAULT_POOL_BYTES, max_pinned_size: int = DEFAULT_MAX_BYTES,
                 pinned: bool | None = None):
        if pinned_pool_size < PAGE_BYTES or pinned_pool_size > max_pinned_size:
            raise ValueError(f"pinned_pool_size={pinned_pool_size}, max_pinned_size={max_pinned_size}: need "
                             f"{PAGE_BYTES} <= pinned_pool_size <= max_pinned_size")
        self.pinned = torch.cuda.is_available() if pinned is None else pinned
        self.max_bytes = _round_up(max_pinned_size)
        self._arena_bytes = _round_up(pinned_pool_size)
        self._arenas = [_Arena(self._arena_bytes, self.pinned, reserve=True)]  # "reserved at start"
        self._live: dict[int, tuple[_Arena, int, int]] = {}
        self._cond = threading.Condition()
        self._used = self._peak = 0
        self._counts = {"allocations": 0, "releases": 0, "waits": 0, "failed_allocations": 0}

    @classmethod
    def configure(cls, pinned_pool_size: int, max_pinned_size: int) -> "PinnedMemoryPool":
        """Create the process's pool with these sizes; an existing pool may only grow its ``max_pinned_size``."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls(pinned_pool_size, max_pinned_size)
            else:
                cls._instance._raise_limit(max_pinned_size)
            return cls._instance

    def allocate(self, nbytes: int, timeout: float | None = None) -> torch.Tensor:
        """A 1-D uint8 buffer of ``nbytes`` (4 KiB aligned); waits up to ``timeout`` s (None: forever) when full."""
        if not isinstance(nbytes, int) or nbytes < 1 or _round_up(nbytes) > self.max_bytes:
            raise ValueError(f"nbytes={nbytes!r}: must be an int in 1..max_pinned_size ({self.max_bytes})")
        npages = _round_up(nbytes) // PAGE_BYTES
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                buf = self._take(npages, nbytes)
                if buf is not None:
                    return buf
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._counts["failed_allocations"] += 1
                    raise PoolExhaustedError(
                        f"pinned pool exhausted: {nbytes} bytes wanted, {self._used} of {self.max_bytes} in use "
                        f"(max_pinned_size); raise max_pinned_size or release buffers")
                self._counts["waits"] += 1
                self._cond.wait(remaining)

    def reserve(self, nbytes: int) -> None:
        """Take arenas from the OS now until the pool spans ``min(nbytes, max_pinned_size)`` bytes, so that no
        later :meth:`allocate` pins memory on a caller's hot path (e.g. a GPU step saving KV blocks)."""
        with self._cond:
            while sum(a.nbytes for a in self._arenas) < min(_round_up(nbytes), self.max_bytes):
                if self._grow(1) is None:
                    break

    def release(self, buf: torch.Tensor) -> None:
        """Take back a buffer returned by :meth:`allocate`; wakes waiting allocations."""
        with self._cond:
            entry = self._live.pop(buf.data_ptr(), None)
            if entry is None:
                raise ValueError("buf: not a live buffer of this pool (released twice, or not from allocate())")
            arena, start, npages = entry
            mark_run(arena.used, start, npages, 0)
            self._used -= npages * PAGE_BYTES
            self._counts["releases"] += 1
            self._cond.notify_all()

    def get_stats(self) -> dict:
        """Bytes ``currently_used``, ``total_allocated`` (reserved), ``peak_allocated``, ``max_pinned_size``; counts."""
        with self._cond:
            return {"currently_used": self._used, "total_allocated": sum(a.nbytes for a in self._arenas),
                    "peak_allocated": self._peak, "max_pinned_size": self.max_bytes,
                    "live_buffers": len(self._live), "arenas": len(self._arenas), "pinned": self.pinned,
                    **self._counts}

    def _take(self, npages: int, nbytes: int) -> torch.Tensor | None:
        for arena in self._arenas:
            if npages <= len(arena.used) and (start := arena.take(npages)) >= 0:
                return self._hand_out(arena, start, npages, nbytes)
        arena = self._grow(npages)
        if arena is None:
            return None
        return self._hand_out(arena, arena.take(npages), npages, nbytes)

    def _grow(self, npages: int) -> _Arena | None:
        total = sum(a.nbytes for a in self._arenas)
        size = max(self._arena_bytes, npages * PAGE_BYTES)
        size = min(size, self.max_bytes - total)
        if size < npages * PAGE_BYTES:
            return None
        self._arenas.append(_Arena(size, self.pinned))
        return self._arenas[-1]

    def _hand_out(self, arena: _Arena, start: int, npages: int, nbytes: int) -> torch.Tensor:
        buf = arena.memory[start * PAGE_BYTES:start * PAGE_BYTES + nbytes]
        self._live[buf.data_ptr()] = (arena, start, npages)
        self._used += npages * PAGE_BYTES
        self._peak = max(self._peak, self._used)
        self._counts["allocations"] += 1
        return buf

    def _raise_limit(self, max_pinned_size: int) -> None:
        with self._cond:
            self.max_bytes = max(self.max_bytes, _round_up(max_pinned_size))
            self._cond.notify_all()


def page_locked_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """``[nbytes]`` uint8 host memory starting on a page boundary; page-locked (DMA-able and addressable by
    kernels, ``is_pinned()`` true) when ``pinned``.

    Pinned memory is ordinary memory registered with CUDA (``cudaHostRegister``, as vLLM's CPU offloading does)
    for exactly ``nbytes``: torch's pinned allocator rounds each reservation up to a power of two (a 24 GiB pool
    would lock 32 GiB) and, in torch 2.11, does not start it on a page boundary. The registration is dropped when
    the last view of the buffer is freed.
    """
    raw = np.empty(nbytes + PAGE_BYTES, dtype=np.uint8)
    skip = (-raw.ctypes.data) % PAGE_BYTES
    aligned = raw[skip:skip + nbytes]
    if pinned:
        _register_with_cuda(aligned)
    with torch.inference_mode(False):  # store threads write it outside any caller's inference mode
        return torch.from_numpy(aligned)


def _register_with_cuda(memory: np.ndarray) -> None:
    """Page-lock ``memory`` (a 1-D uint8 array) until it is freed."""
    cudart = torch.cuda.cudart()
    address = memory.ctypes.data
    error = cudart.cudaHostRegister(address, memory.nbytes, 0)
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of {memory.nbytes} bytes failed (CUDA error {int(error)}): the "
                           "memory lock limit (ulimit -l) or the host's free memory may be too small")
    weakref.finalize(memory, cudart.cudaHostUnregister, address)


def _round_up(nbytes: int) -> int:
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES
