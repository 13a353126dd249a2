"""PinnedMemoryPool: Numba bookkeeping vs its twin, accounting under threads, growth bound, exhaustion."""
import threading
import time

import numpy as np
import pytest
import torch

from ucm_store.pool import (PAGE_BYTES, PinnedMemoryPool, PoolExhaustedError, find_free_run,
                            find_free_run_reference, page_locked_buffer)

MiB = 1 << 20


@pytest.mark.parametrize("seed", range(20))
def test_find_free_run_equals_twin(seed):
    rng = np.random.default_rng(seed)
    used = (rng.random(300) < rng.uniform(0.1, 0.9)).astype(np.uint8)
    for npages in (1, 2, 3, 5, 300):
        hint = int(rng.integers(0, 300))
        got = find_free_run(used, npages, hint)
        assert got == find_free_run_reference(used.tolist(), npages, hint)
        if got >= 0:
            assert not used[got:got + npages].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locking needs CUDA (run by bench/run_gpu.sh tests)")
@pytest.mark.parametrize("nbytes", [5000, 3 << 20])
def test_pinned_memory_is_page_locked_aligned_and_exactly_sized(nbytes):
    buf = page_locked_buffer(nbytes, pinned=True)
    assert (buf.is_pinned(), buf.numel(), buf.data_ptr() % PAGE_BYTES) == (True, nbytes, 0)
    gpu = torch.arange(nbytes, device="cuda").to(torch.uint8)
    buf.copy_(gpu, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(buf, gpu.cpu())


def test_buffers_are_aligned_distinct_and_accounted():
    pool = PinnedMemoryPool(4 * MiB, 4 * MiB)
    a, b = pool.allocate(5000), pool.allocate(PAGE_BYTES)
    assert a.dtype == torch.uint8 and a.numel() == 5000 and a.data_ptr() % PAGE_BYTES == 0
    a.fill_(1)
    b.fill_(2)
    assert bool((a == 1).all()) and bool((b == 2).all())
    stats = pool.get_stats()
    assert stats["currently_used"] == 3 * PAGE_BYTES and stats["total_allocated"] == 4 * MiB
    pool.release(a)
    assert pool.get_stats()["currently_used"] == PAGE_BYTES
    assert pool.get_stats()["peak_allocated"] == 3 * PAGE_BYTES


def test_grows_to_max_and_never_beyond():
    pool = PinnedMemoryPool(1 * MiB, 3 * MiB)
    bufs = [pool.allocate(MiB) for _ in range(3)]
    stats = pool.get_stats()
    assert stats["arenas"] == 3 and stats["total_allocated"] == 3 * MiB
    with pytest.raises(PoolExhaustedError, match="pinned pool exhausted: 4096 bytes wanted"):
        pool.allocate(PAGE_BYTES, timeout=0)
    assert pool.get_stats()["total_allocated"] == 3 * MiB
    for buf in bufs:
        pool.release(buf)
    assert pool.get_stats()["currently_used"] == 0


def test_exhaustion_waits_for_a_release():
    pool = PinnedMemoryPool(MiB, MiB)
    held = pool.allocate(MiB)
    threading.Timer(0.2, pool.release, args=(held,)).start()
    start = time.monotonic()
    buf = pool.allocate(MiB, timeout=5)
    assert 0.1 < time.monotonic() - start < 5
    assert pool.get_stats()["waits"] >= 1
    pool.release(buf)


def test_concurrent_threads_keep_exact_accounting():
    pool = PinnedMemoryPool(2 * MiB, 2 * MiB)
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            size = int(rng.integers(1, 64 * 1024))
            buf = pool.allocate(size, timeout=10)
            buf.fill_(seed)
            if not bool((buf == seed).all()):
                errors.append(seed)
            pool.release(buf)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = pool.get_stats()
    assert not errors
    assert stats["currently_used"] == 0 and stats["live_buffers"] == 0
    assert stats["allocations"] == stats["releases"] == 1600
    assert 0 < stats["peak_allocated"] <= 2 * MiB


def test_bad_requests():
    pool = PinnedMemoryPool(MiB, MiB)
    with pytest.raises(ValueError, match="nbytes=2097152: must be an int in 1..max_pinned_size"):
        pool.allocate(2 * MiB)
    with pytest.raises(ValueError, match="nbytes=0"):
        pool.allocate(0)
    buf = pool.allocate(10)
    pool.release(buf)
    with pytest.raises(ValueError, match="not a live buffer"):
        pool.release(buf)
    with pytest.raises(ValueError, match="pinned_pool_size=2097152, max_pinned_size=1048576"):
        PinnedMemoryPool(2 * MiB, MiB)


def test_singleton_and_configure():
    assert PinnedMemoryPool.get_instance() is PinnedMemoryPool.get_instance()
    pool = PinnedMemoryPool.configure(MiB, 8 << 30)
    assert pool is PinnedMemoryPool.get_instance() and pool.get_stats()["max_pinned_size"] >= 8 << 30


def test_reserve_takes_arenas_up_to_the_limit_without_handing_out_buffers():
    pool = PinnedMemoryPool(pinned_pool_size=1 << 20, max_pinned_size=5 << 20, pinned=False)
    pool.reserve(3 << 20)
    assert pool.get_stats()["arenas"] == 3 and pool.get_stats()["currently_used"] == 0
    pool.reserve(64 << 20)  # capped at max_pinned_size
    assert pool.get_stats()["total_allocated"] == 5 << 20
    buf = pool.allocate(1 << 20, timeout=1)
    assert pool.get_stats()["arenas"] == 5 and buf.numel() == 1 << 20
