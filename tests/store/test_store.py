"""The tiered store contract: visibility only after commit, sharing across processes, crash safety,
corruption detection, LRU bounds, prefetch, offsets and error reporting. Real files, real processes."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from ucm_store.backends.cache import CacheTier
from ucm_store.backends.posix import PosixTier, block_files
from ucm_store.factory import UcmConnectorFactory
from ucm_store.pipeline import UcmPipelineStore, block_key
from ucm_store.pool import PinnedMemoryPool
from ucm_store.task import TaskStatus

BLOCK = 64 * 1024


def make_store(tmp_path, pipeline="Cache|Posix", **extra):
    config = {"store_pipeline": pipeline, "storage_backends": str(tmp_path / "store"), **extra}
    return UcmConnectorFactory.create_connector(config, local_rank=0)


def block_data(i: int, nbytes: int = BLOCK) -> torch.Tensor:
    """Deterministic, block-specific random bytes (so any mix-up between blocks shows)."""
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def ids(n, tag="b"):
    return [f"{tag}{i}".encode() for i in range(n)]


def dump_commit(store, block_ids, datas):
    task = store.dump(block_ids, 0, torch.stack(datas))
    assert store.wait(task) == TaskStatus.SUCCESS, task.describe_failures()
    return store.commit(block_ids, [True] * len(block_ids))


def load_all(store, block_ids, nbytes=BLOCK):
    out = torch.full((len(block_ids), nbytes), 7, dtype=torch.uint8)
    task = store.load(block_ids, 0, out)
    return store.wait(task), out, task


@pytest.mark.parametrize("pipeline", ["Cache|Posix", "Posix", "Cache", "Cache|NFS"])
def test_round_trip_and_visibility_only_after_commit(tmp_path, pipeline):
    with make_store(tmp_path, pipeline) as store:
        keys = ids(6)
        datas = [block_data(i) for i in range(6)]
        task = store.dump(keys, 0, torch.stack(datas))
        assert store.wait(task) == TaskStatus.SUCCESS and store.check(task)
        assert store.lookup(keys) == [False] * 6
        assert store.commit(keys, [True, True, True, False, True, True]) == [True, True, True, False, True, True]
        assert store.lookup(keys) == [True, True, True, False, True, True]
        assert store.lookup_on_prefix(keys) == 2
        status, out, _ = load_all(store, keys[:3] + keys[4:])
        assert status == TaskStatus.SUCCESS
        assert torch.equal(out, torch.stack(datas[:3] + datas[4:]))


def test_failed_dump_never_becomes_visible(tmp_path):
    pool = PinnedMemoryPool(1 << 20, 1 << 20)
    tiers = [CacheTier(4, pool), PosixTier((str(tmp_path / "store"),))]
    with UcmPipelineStore(tiers, pool) as store:
        big = torch.zeros(2 << 20, dtype=torch.uint8)
        task = store.dump([b"too-big"], 0, big)
        assert store.wait(task) == TaskStatus.FAILURE
        assert "nbytes=2097152" in task.describe_failures() and b"too-big".hex() in task.describe_failures()
        assert store.commit([b"too-big"], [True]) == [False]
        assert store.lookup([b"too-big"]) == [False]


def test_offsets_build_a_block_from_parts_and_load_slices(tmp_path):
    with make_store(tmp_path) as store:
        layers = [block_data(i, 4096) for i in range(4)]
        for layer, data in enumerate(layers):
            store.wait(store.dump([b"blk"], layer * 4096, data))
        assert store.commit([b"blk"], [True]) == [True]
        part = torch.empty(4096, dtype=torch.uint8)
        assert store.wait(store.load([b"blk"], 2 * 4096, part)) == TaskStatus.SUCCESS
        assert torch.equal(part, layers[2])
        whole = torch.empty(4 * 4096, dtype=torch.uint8)
        store.wait(store.load([b"blk"], 0, whole))
        assert torch.equal(whole, torch.cat(layers))
        bad = store.load([b"blk"], 4 * 4096 - 8, torch.empty(16, dtype=torch.uint8))
        assert store.wait(bad) == TaskStatus.FAILURE
        assert "bytes [16376, 16392) were asked for" in bad.describe_failures()


def test_parts_with_a_gap_fail_the_commit(tmp_path):
    with make_store(tmp_path) as store:
        store.wait(store.dump([b"gap"], 0, block_data(0, 4096)))
        store.wait(store.dump([b"gap"], 8192, block_data(1, 4096)))
        assert store.commit([b"gap"], [True]) == [False]
        assert store.lookup([b"gap"]) == [False]


def test_dumping_a_committed_block_again_is_a_noop(tmp_path):
    with make_store(tmp_path) as store:
        dump_commit(store, [b"x"], [block_data(1)])
        task = store.dump([b"x"], 0, block_data(2))
        assert store.wait(task) == TaskStatus.SUCCESS
        assert store.commit([b"x"], [True]) == [True]
        _, out, _ = load_all(store, [b"x"])
        assert torch.equal(out[0], block_data(1))


def test_missing_block_load_fails_naming_block_and_cause(tmp_path):
    with make_store(tmp_path) as store:
        status, out, task = load_all(store, [b"nope"])
        assert status == TaskStatus.FAILURE
        assert b"nope".hex() in task.describe_failures() and "in no tier of Cache|Posix" in task.describe_failures()
        assert bool((out == 7).all())


def test_bad_arguments_name_the_problem(tmp_path):
    with make_store(tmp_path) as store:
        with pytest.raises(ValueError, match="block_ids\\[1\\]: expected non-empty bytes"):
            store.lookup([b"a", "b"])
        with pytest.raises(ValueError, match="offset: expected a byte offset >= 0, got -1"):
            store.dump([b"a"], -1, block_data(0))
        with pytest.raises(ValueError, match="do not split into 3 equal"):
            store.dump(ids(3), 0, torch.zeros(10, dtype=torch.uint8))
        with pytest.raises(ValueError, match="must be contiguous"):
            store.dump(ids(2), 0, torch.zeros(4, 6).t())
        with pytest.raises(ValueError, match="success_flags: 1 flags for 2 block_ids"):
            store.commit(ids(2), [True])
    with pytest.raises(ValueError, match="storage_backends: the Posix tier .* needs at least one directory"):
        UcmConnectorFactory.create_connector({"store_pipeline": "Posix"}, 0)
    with pytest.raises(ValueError, match="mooncake_master"):
        UcmConnectorFactory.create_connector({"store_pipeline": "Cache|Mooncake"}, 0)


def test_unwritable_storage_directory_fails_at_create(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="storage_backends: .*file.* is not a writable directory for the Posix tier"):
        UcmConnectorFactory.create_connector({"store_pipeline": "Posix", "storage_backends": str(blocker)}, 0)


SHARE_WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_store import make_store, block_data, ids, dump_commit
from pathlib import Path
store = make_store(Path({tmp!r}), {pipeline!r})
dump_commit(store, ids(8, "shared"), [block_data(i) for i in range(8)])
store.close()
"""


@pytest.mark.parametrize("pipeline", ["Posix", "Cache|Posix"])
def test_two_processes_share_one_directory(tmp_path, pipeline):
    code = SHARE_WRITER.format(tests=os.path.dirname(__file__), tmp=str(tmp_path), pipeline=pipeline)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with make_store(tmp_path, pipeline) as reader:
        assert reader.lookup(ids(8, "shared")) == [True] * 8
        status, out, _ = load_all(reader, ids(8, "shared"))
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(8)]))


CRASH_WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_store import make_store, block_data, dump_commit
from pathlib import Path
store = make_store(Path({tmp!r}), {pipeline!r})
i = 0
while True:
    dump_commit(store, [f"crash{{i}}".encode()], [block_data(i, 1 << 20)])
    i += 1
    if i == 3:
        print("writing", flush=True)
"""


@pytest.mark.parametrize("pipeline", ["Posix", "Cache|Posix"])
def test_sigkill_mid_dump_leaves_no_partial_block(tmp_path, pipeline):
    code = CRASH_WRITER.format(tests=os.path.dirname(__file__), tmp=str(tmp_path), pipeline=pipeline)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    names = [f"crash{i}".encode() for i in range(2000)]
    with make_store(tmp_path, "Posix") as watcher:  # kill mid-stream, once 3 blocks are durable (write-down
        deadline = time.monotonic() + 30  # latency varies with the machine's load)
        while sum(watcher.lookup(names[:3])) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with make_store(tmp_path, "Posix") as reader:
        visible = [n for n, hit in zip(names, reader.lookup(names)) if hit]
        assert len(visible) >= 3
        status, out, task = load_all(reader, visible, 1 << 20)
        assert status == TaskStatus.SUCCESS, task.describe_failures()
        for name, got in zip(visible, out):
            assert torch.equal(got, block_data(int(name[5:]), 1 << 20)), name


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_or_truncated_file_fails_the_load_and_leaves_lookup(tmp_path, damage):
    with make_store(tmp_path, "Posix") as store:
        dump_commit(store, [b"victim"], [block_data(3)])
        path = next(p for p in block_files(tmp_path / "store") if p.stem == block_key(b"victim"))
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[-100] ^= 0xFF
        path.write_bytes(raw[:len(raw) // 2] if damage == "truncate" else b"" if damage == "empty" else raw)
        status, out, task = load_all(store, [b"victim"])
        assert status == TaskStatus.FAILURE and bool((out == 7).all())
        assert "truncated" in task.failures[b"victim"] or "CRC32" in task.failures[b"victim"]
        assert store.lookup([b"victim"]) == [False]


def test_cache_lru_honours_capacity_and_lower_tier_keeps_everything(tmp_path):
    with make_store(tmp_path, cache_capacity=4) as store:
        for i in range(10):
            dump_commit(store, [f"lru{i}".encode()], [block_data(i)])
            store.flush()  # write-down done: no block is pinned, so eviction order is pure LRU
        assert len(store.cache) == 4
        assert [store.cache.contains(block_key(f"lru{i}".encode())) for i in range(10)] == [False] * 6 + [True] * 4
        status, out, _ = load_all(store, ids(10, "lru"))
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(10)]))
        assert len(store.cache) == 4


def test_cache_blocks_held_together_outlive_eviction_until_released():
    """hold_many pins every present block (a key listed twice as well) against eviction while held, refreshes
    their recency in the order listed and yields None for absent keys; released, they are evictable again."""
    pool = PinnedMemoryPool(1 << 20, 1 << 20)
    cache = CacheTier(capacity=3, pool=pool)
    for key in "abc":
        assert cache.put(key, torch.full((16,), ord(key), dtype=torch.uint8))
    with cache.hold_many(["a", "x", "b", "a"]) as held:
        assert [None if buf is None else int(buf[0]) for buf in held] == [ord("a"), None, ord("b"), ord("a")]
        for key in "def":
            cache.put(key, torch.zeros(16, dtype=torch.uint8))
        assert [cache.contains(key) for key in "abcdef"] == [True, True, False, False, False, True]
    cache.put("g", torch.zeros(16, dtype=torch.uint8))  # b is now the least recently used, and free to go
    assert [cache.contains(key) for key in "abfg"] == [True, False, True, True]
    cache.close()


def test_cache_is_back_within_capacity_once_write_downs_finish(tmp_path):
    with make_store(tmp_path, cache_capacity=4) as store:
        dump_commit(store, ids(12, "burst"), [block_data(i) for i in range(12)])
        store.flush()
        assert len(store.cache) == 4


def test_posix_capacity_evicts_least_recently_used_files(tmp_path):
    file_bytes = BLOCK + 64
    with make_store(tmp_path, "Posix", storage_capacity=5 * file_bytes) as store:
        for i in range(5):
            dump_commit(store, [f"cap{i}".encode()], [block_data(i)])
        load_all(store, [b"cap0"])
        for i in range(5, 8):
            dump_commit(store, [f"cap{i}".encode()], [block_data(i)])
        assert store.lookup(ids(8, "cap")) == [True, False, False, False, True, True, True, True]
        assert store.tiers[0].used_bytes <= 5 * file_bytes


def test_prefetch_reads_ahead_into_the_cache(tmp_path):
    with make_store(tmp_path) as writer:
        dump_commit(writer, ids(8, "pf"), [block_data(i) for i in range(8)])
    with make_store(tmp_path, prefetch_enabled=True, prefetch_depth=3) as store:
        assert len(store.cache) == 0
        assert store.lookup_on_prefix(ids(8, "pf")) == 7
        deadline = time.monotonic() + 10
        while len(store.cache) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert [store.cache.contains(block_key(b)) for b in ids(8, "pf")] == [True] * 3 + [False] * 5


def test_lookup_prefix_tiers_names_the_tier_each_leading_hit_loads_from(tmp_path):
    with make_store(tmp_path) as writer:
        dump_commit(writer, ids(4, "lt"), [block_data(i) for i in range(4)])
        assert writer.lookup_prefix_tiers(ids(6, "lt")) == ["Cache"] * 4
    with make_store(tmp_path) as store:  # a fresh process's store: the Cache tier starts empty
        assert store.lookup_prefix_tiers(ids(6, "lt")) == ["Posix"] * 4 and store.lookup_on_prefix(ids(6, "lt")) == 3
        assert load_all(store, ids(2, "lt"))[0] == TaskStatus.SUCCESS  # loading promotes into the Cache
        assert store.lookup_prefix_tiers(ids(4, "lt")) == ["Cache", "Cache", "Posix", "Posix"]
        assert store.lookup_prefix_tiers([b"absent"] + ids(4, "lt")) == []


class CountingPosix(PosixTier):
    """A real Posix tier that counts (and slows) reads, to show concurrent loads share one transfer."""

    reads = 0

    def read(self, key, dst):
        CountingPosix.reads += 1
        time.sleep(0.2)
        super().read(key, dst)


def test_concurrent_loads_of_one_block_share_one_read(tmp_path):
    with make_store(tmp_path) as writer:
        dump_commit(writer, [b"hot"], [block_data(9)])
    store = make_store(tmp_path)
    store.tiers[1] = CountingPosix((str(tmp_path / "store"),))
    outs = [torch.empty(BLOCK, dtype=torch.uint8) for _ in range(6)]
    tasks = [store.load([b"hot"], 0, out) for out in outs]
    assert all(store.wait(t) == TaskStatus.SUCCESS for t in tasks)
    assert CountingPosix.reads == 1 and all(torch.equal(o, block_data(9)) for o in outs)
    store.close()


@pytest.mark.parametrize("strategy", ["round_robin", "hash"])
def test_nfs_spreads_over_several_paths_and_finds_every_block(tmp_path, strategy):
    roots = [str(tmp_path / "nfs1"), str(tmp_path / "nfs2")]
    config = {"store_pipeline": "Cache|NFS", "storage_backends": roots, "path_strategy": strategy}
    with UcmConnectorFactory.create_connector(config, 0) as store:
        dump_commit(store, ids(16, "n"), [block_data(i) for i in range(16)])
    counts = [len(block_files(tmp_path / r)) for r in ("nfs1", "nfs2")]
    assert sum(counts) == 16 and min(counts) >= 3
    with UcmConnectorFactory.create_connector({**config, "store_pipeline": "NFS"}, 0) as reader:
        status, out, _ = load_all(reader, ids(16, "n"))
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(16)]))


def test_direct_io_round_trip_and_readable_without_it(tmp_path):
    with make_store(tmp_path, "Posix", use_direct_io=True) as store:
        dump_commit(store, ids(3, "d"), [block_data(i, 10_000) for i in range(3)])
        status, out, _ = load_all(store, ids(3, "d"), 10_000)
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i, 10_000) for i in range(3)]))
    with make_store(tmp_path, "Posix") as buffered:
        status, out, _ = load_all(buffered, ids(3, "d"), 10_000)
        assert status == TaskStatus.SUCCESS and torch.equal(out[2], block_data(2, 10_000))


def test_close_drains_pending_write_downs(tmp_path):
    store = make_store(tmp_path)
    dump_commit(store, ids(20, "w"), [block_data(i) for i in range(20)])
    store.close()
    assert len(block_files(tmp_path / "store")) == 20


def test_files_are_owner_only(tmp_path):
    with make_store(tmp_path, "Posix") as store:
        dump_commit(store, [b"perm"], [block_data(0)])
    path = block_files(tmp_path / "store")[0]
    assert path.stat().st_mode & 0o077 == 0 and (tmp_path / "store" / "blocks").stat().st_mode & 0o077 == 0


def test_threads_hammering_one_store_stay_consistent(tmp_path):
    with make_store(tmp_path, cache_capacity=16) as store:
        errors = []

        def worker(w):
            for i in range(15):
                name = [f"t{w}-{i}".encode()]
                dump_commit(store, name, [block_data(w * 100 + i, 8192)])
                status, out, _ = load_all(store, name, 8192)
                if status != TaskStatus.SUCCESS or not torch.equal(out[0], block_data(w * 100 + i, 8192)):
                    errors.append(name)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []


class BatchRecordingPosix(PosixTier):
    """A real Posix tier that records the size of each batch the write-down hands it."""

    def __init__(self, roots, **kwargs):
        super().__init__(roots, **kwargs)
        self.batches = []

    def put_many(self, items):
        self.batches.append(len(items))
        return super().put_many(items)


@pytest.mark.parametrize("direct", [False, True])
def test_write_downs_are_published_in_batches_and_read_back_from_disk(tmp_path, direct):
    pool = PinnedMemoryPool(16 << 20, 16 << 20)
    disk = BatchRecordingPosix((str(tmp_path / "store"),), use_direct_io=direct)
    names = ids(40, "batch")
    with UcmPipelineStore([CacheTier(100, pool), disk], pool) as store:
        assert dump_commit(store, names, [block_data(i) for i in range(40)]) == [True] * 40
        store.flush(timeout=30)
        assert store.writeback_failures == 0
    assert sum(disk.batches) == 40 and max(disk.batches) > 1
    assert not os.listdir(tmp_path / "store" / "tmp") and len(block_files(tmp_path / "store")) == 40
    with make_store(tmp_path, "Posix", use_direct_io=direct) as fresh:  # a new process's view: the files alone
        status, out, _ = load_all(fresh, names)
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(40)]))


def test_staged_buffers_publish_on_commit_and_cached_buffers_are_held_in_place(tmp_path):
    """stage_buffers hands out pool buffers to fill in place (a GPU kernel, in the connector): invisible until
    committed; hold_cached lends the Cache tier's buffers for in-place reads; promote brings blocks up into them."""
    with UcmConnectorFactory.create_connector({"store_pipeline": "Cache|Posix",
                                               "storage_backends": str(tmp_path)}) as store:
        payload = torch.randint(0, 256, (2, 4096), dtype=torch.uint8)
        buffers = store.stage_buffers([b"a", b"b"], 4096)
        for buf, row in zip(buffers, payload):
            buf.copy_(row)
        assert store.lookup([b"a", b"b"]) == [False, False]
        assert store.commit([b"a", b"b"], [True, False]) == [True, False]
        assert store.lookup([b"a", b"b"]) == [True, False] and store.stage_buffers([b"a"], 4096) == [None]
        with store.hold_cached([b"a", b"b"]) as held:
            assert torch.equal(held[0], payload[0]) and held[1] is None
        store.flush()
    with UcmConnectorFactory.create_connector({"store_pipeline": "Cache|Posix",
                                               "storage_backends": str(tmp_path)}) as fresh:
        with fresh.hold_cached([b"a"]) as held:
            assert held == [None]  # on disk only
        task = fresh.promote([b"a", b"b"])
        assert fresh.wait(task) == 1 and list(task.failures) == [b"b"]
        with fresh.hold_cached([b"a"]) as held:
            assert torch.equal(held[0], payload[0])


class ThreadRecordingPosix(PosixTier):
    """A real Posix tier that records which thread publishes each batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = []

    def put_many(self, items):
        self.threads.append(threading.current_thread())
        return super().put_many(items)


def test_write_through_commit_writes_down_on_the_calling_thread_before_returning(tmp_path):
    pool = PinnedMemoryPool(16 << 20, 16 << 20)
    disk = ThreadRecordingPosix((str(tmp_path / "store"),))
    names = ids(70, "wt")
    with UcmPipelineStore([CacheTier(100, pool), disk], pool) as store:
        task = store.dump(names, 0, torch.stack([block_data(i) for i in range(70)]))
        assert store.wait(task) == TaskStatus.SUCCESS
        assert store.commit(names, [True] * 70, write_through=True) == [True] * 70
        assert len(block_files(tmp_path / "store")) == 70 and store.write_down.pending == 0
        assert disk.threads == [threading.current_thread()] * 2  # 64 + 6: one durability round per batch
        assert store.lookup_prefix_tiers(names) == ["Cache"] * 70  # still in the Cache, unpinned
        assert store.cache.size(block_key(names[0])) == BLOCK and len(store.cache) == 70
    with make_store(tmp_path, "Posix") as fresh:
        status, out, _ = load_all(fresh, names)
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(70)]))


def test_lookup_view_sees_lower_tiers_and_reported_ids_without_pool_threads_or_numba(tmp_path):
    with make_store(tmp_path) as store:
        dump_commit(store, ids(5, "lv"), [block_data(i) for i in range(5)])
    config = {"store_pipeline": "Cache|Posix", "storage_backends": str(tmp_path / "store")}
    view = UcmConnectorFactory.create_lookup(config)
    assert [tier.name for tier in view.tiers] == ["Posix"]
    assert view.lookup_prefix_tiers(ids(7, "lv")) == ["Posix"] * 5
    assert view.lookup_prefix_tiers(ids(7, "lv"), cached={b"lv1", b"lv5"}) == ["Posix", "Cache"] + ["Posix"] * 3 + [
        "Cache"]
    assert view.lookup_prefix_tiers([b"absent"] + ids(2, "lv")) == []
    with pytest.raises(ValueError, match="block_ids"):
        view.lookup_prefix_tiers([""])
    view.close()
    code = textwrap.dedent(f"""
        import sys, threading
        from ucm_store.factory import UcmConnectorFactory
        from ucm_store.pool import PinnedMemoryPool
        view = UcmConnectorFactory.create_lookup({config!r})
        assert view.lookup_prefix_tiers([b"lv0", b"lv1"]) == ["Posix", "Posix"]
        print(PinnedMemoryPool._instance is None, threading.active_count(), "numba" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "1", "False"], done.stderr[-2000:]
