"""Faults injected for real, and what the store does about each (RELIABILITY.md lists them with these tests):
SIGKILL at each step of dump, commit and write-down; a full disk (a 1 MiB tmpfs); read-only and unwritable storage;
damaged block files on every read path; four processes writing the same blocks while another reads them; remote
servers down, hung or slow; an exhausted pinned pool. Needs root (mount), as CI has."""
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from servers import S3_KEYS, MotoS3Server, SlowProxy, free_port
from test_store import block_data, dump_commit, ids, load_all

from ucm_store.backends import framing, posix
from ucm_store.backends.cache import CacheTier
from ucm_store.backends.posix import STALE_TMP_SECONDS, PosixTier
from ucm_store.factory import UcmConnectorFactory
from ucm_store.metrics import StatsMonitor, health_warnings
from ucm_store.pipeline import UcmPipelineStore, block_key
from ucm_store.pool import PinnedMemoryPool
from ucm_store.task import TaskStatus

TESTS = os.path.dirname(os.path.abspath(__file__))
REMOTE = {"remote_timeout": 1.0, "remote_retry_interval": 0.5}
REMOTE_BOUND_S = 3 * REMOTE["remote_timeout"] + 1.0  # a request, its retries and the thread hand-offs


def make(config: dict):
    return UcmConnectorFactory.create_connector(config, local_rank=0)


def disk_store(root: Path, pipeline: str = "Posix", **extra):
    return make({"store_pipeline": pipeline, "storage_backends": str(root), **extra})


def block_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in posix.block_files(root))


def temp_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in (root / "tmp").iterdir())


@contextmanager
def mounted(target: Path, *args: str):
    """``mount ARGS target`` (target created first); unmounted on exit (lazily if something still holds it)."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(target)], check=True)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)]).returncode:
            subprocess.run(["umount", "-l", str(target)], check=True)


def remount(target: Path, mode: str) -> None:
    """Make the bind mount ``target`` read-only ("ro") or writable ("rw") again."""
    subprocess.run(["mount", "-o", f"remount,{mode},bind", str(target)], check=True)


def forked(target: str, args_list: list[tuple]) -> subprocess.Popen:
    """A new process (its own process group) that imports this module once, then forks one child per entry of
    ``args_list`` to run ``target(*args)``; its stdout carries what the children print. Forking spares each child
    the seconds of importing torch, Numba and the store."""
    code = f"import sys; sys.path.insert(0, {TESTS!r}); import test_faults; test_faults.fork_children({target!r}, " \
           f"{args_list!r})"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)


def fork_children(target: str, args_list: list[tuple]) -> None:
    """Body of :func:`forked`: warm the pool's Numba functions up, fork the children, reap them; exit status 1 if
    any child failed (a child killed by a signal is not a failure: the crash tests kill them)."""
    pool = PinnedMemoryPool(4096, 4096)
    pool.release(pool.allocate(1))
    pids = []
    for args in args_list:
        pid = os.fork()
        if pid == 0:
            try:
                globals()[target](*args)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            sys.stdout.flush()
            os._exit(0)
        pids.append(pid)
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    sys.exit(int(any(os.WIFEXITED(status) and os.WEXITSTATUS(status) for status in statuses)))


def end_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (a :func:`forked` process and its children) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdout.close()


# ---- SIGKILL at precise points of dump, commit and write-down --------------------------------------------------
CRASH_BLOCK = 1 << 20
VICTIM = b"victim"
CRASH_POINTS = {  # point -> (pipeline of the killed writer, victim block visible to a new process afterwards)
    "staged": ("Posix", False),  # 2 of the block's 4 layer parts dumped, commit not called
    "mid-write": ("Posix", False),  # temp file holds the header and half the payload
    "written": ("Posix", False),  # temp file complete, not fsynced
    "synced": ("Posix", False),  # temp file fsynced, not renamed
    "renamed": ("Posix", True),  # renamed into place and the directory fsynced; commit has not returned
    "write-down": ("Cache|Posix", False),  # commit returned (the Cache holds it); write-down cut mid-file
}


def say(point: str, state: str) -> None:
    """"<point> <pid> <state>" on stdout in one write: the writers share the pipe, a line must not interleave."""
    os.write(1, f"{point} {os.getpid()} {state}\n".encode())


def stop_here(point: str) -> None:
    """Say "<point> <pid> stopped" and stop for good, for the test to SIGKILL this process here."""
    say(point, "stopped")
    time.sleep(3600)


class PausingPosix(PosixTier):
    """A real Posix tier that stops (:func:`stop_here`) at ``step`` of writing block ``victim``."""

    def __init__(self, roots, point: str, victim: str, **kwargs):
        super().__init__(roots, **kwargs)
        self.point, self.victim = point, victim
        self.step = "mid-write" if point == "write-down" else point

    def _stop_at(self, key: str, step: str) -> None:
        if key == self.victim and self.step == step:
            stop_here(self.point)

    def _write_framed(self, fd, key, src):
        if key == self.victim and self.step == "mid-write":
            payload = memoryview(src.numpy())
            posix._write_all(fd, [framing.pack_header(key, payload), payload[:len(payload) // 2]])
            self._stop_at(key, "mid-write")
        super()._write_framed(fd, key, src)
        self._stop_at(key, "written")

    def _write_file(self, key, tmp, src, durable=True):
        super()._write_file(key, tmp, src, durable)
        self._stop_at(key, "synced")

    def _account(self, key, nbytes):
        self._stop_at(key, "renamed")
        super()._account(key, nbytes)


def crash_child(root: str, point: str) -> None:
    """The killed writer: commits three blocks, then writes the victim block until it stops at ``point``."""
    pipeline, _ = CRASH_POINTS[point]
    pool = PinnedMemoryPool(16 << 20, 16 << 20)
    disk = PausingPosix((root,), point, block_key(VICTIM))
    store = UcmPipelineStore([CacheTier(64, pool), disk] if pipeline == "Cache|Posix" else [disk], pool)
    dump_commit(store, ids(3, "kept"), [block_data(i, CRASH_BLOCK) for i in range(3)])
    store.flush()
    layers = block_data(99, CRASH_BLOCK).view(4, -1)
    for layer in range(2 if point == "staged" else 4):
        assert store.wait(store.dump([VICTIM], layer * layers.shape[1], layers[layer])) == TaskStatus.SUCCESS
    if point == "staged":
        stop_here(point)
    store.commit([VICTIM], [True])
    store.flush()
    say(point, "not-stopped")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Every crash point at once (one writer process each, run in parallel), each SIGKILLed where it stopped:
    point -> (its storage root, what its writer said)."""
    base = tmp_path_factory.mktemp("crash")
    writers = forked("crash_child", [(str(base / point), point) for point in CRASH_POINTS])
    said, other = {}, []
    try:
        while len(said) < len(CRASH_POINTS):
            line = writers.stdout.readline()
            fields = line.split()
            if not line or len(fields) != 3 or fields[0] not in CRASH_POINTS:  # EOF, or a library's own output
                assert line, f"the writers ended with points {sorted(said)} reported; other output: {other}"
                other.append(line)
                continue
            point, pid, state = fields
            os.kill(int(pid), signal.SIGKILL)
            said[point] = state
    finally:
        end_group(writers)
    return {point: (base / point, said.get(point)) for point in CRASH_POINTS}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_step_of_dump_and_commit_leaves_no_torn_block(crashed, point):
    root, said = crashed[point]
    assert said == "stopped"
    visible = CRASH_POINTS[point][1]
    kept, expected = ids(3, "kept"), [block_data(i, CRASH_BLOCK) for i in range(3)]
    leftovers = temp_files(root)
    assert len(leftovers) == (0 if point in ("staged", "renamed") else 1)
    with disk_store(root) as reader:
        assert reader.lookup(kept + [VICTIM]) == [True] * 3 + [visible]
        status, out, task = load_all(reader, kept, CRASH_BLOCK)
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack(expected)), task.describe_failures()
        if not visible:
            status, out, _ = load_all(reader, [VICTIM], CRASH_BLOCK)
            assert status == TaskStatus.FAILURE and bool((out == 7).all())
            assert dump_commit(reader, [VICTIM], [block_data(99, CRASH_BLOCK)]) == [True]
        status, out, _ = load_all(reader, [VICTIM], CRASH_BLOCK)
        assert status == TaskStatus.SUCCESS and torch.equal(out[0], block_data(99, CRASH_BLOCK))
    assert len(block_files(root)) == 4
    for path in leftovers:
        assert path.stat().st_size <= framing.SMALL_HEADER + CRASH_BLOCK
        os.utime(path, (time.time() - STALE_TMP_SECONDS - 1,) * 2)
    disk_store(root).close()
    assert temp_files(root) == []


# ---- a full disk ---------------------------------------------------------------------------------------------
FULL_BLOCK = 256 << 10


def fill(disk: Path) -> Path:
    """A file taking every free byte of the file system ``disk`` (a real ENOSPC for the next writer)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc
    return filler


@pytest.mark.parametrize("pipeline", ["Posix", "Cache|Posix"])
def test_full_disk_fails_the_dump_cleanly_and_the_store_keeps_serving(tmp_path, caplog, pipeline):
    kept, full, later = ids(2, "kept"), [b"full"], [b"later"]
    monitor = StatsMonitor.get_instance()
    monitor.reset()
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as disk:
        with disk_store(disk, pipeline) as store:
            dump_commit(store, kept, [block_data(i, FULL_BLOCK) for i in range(2)])
            store.flush()
            filler = fill(disk)
            in_use = store.pool.get_stats()["currently_used"]
            assert dump_commit(store, full, [block_data(5, FULL_BLOCK)]) == [pipeline != "Posix"]
            store.flush()
            assert store.writeback_failures == monitor.get_stats()["writedown_failures"] == (pipeline != "Posix")
            assert ("writedown" in health_warnings(monitor.get_stats())) == (pipeline != "Posix")
            assert "No space left on device" in caplog.text and full[0].hex() in caplog.text
            assert temp_files(disk) == [] and len(block_files(disk)) == 2
            assert store.lookup(kept + full) == [True, True, pipeline != "Posix"]
            status, out, _ = load_all(store, kept, FULL_BLOCK)
            assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i, FULL_BLOCK)
                                                                                 for i in range(2)]))
            if pipeline == "Posix":
                assert store.pool.get_stats()["currently_used"] == in_use
            filler.unlink()
            assert dump_commit(store, later, [block_data(6, FULL_BLOCK)]) == [True]
            store.flush()
            assert store.writeback_failures == (pipeline != "Posix") and len(block_files(disk)) == 3


# ---- read-only and unwritable storage ------------------------------------------------------------------------
def test_read_only_file_system_fails_at_create_naming_the_directory(tmp_path):
    with mounted(tmp_path / "ro", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs") as disk:
        with pytest.raises(ValueError, match="storage_backends: '.*/ro' is not a writable directory for the Posix "
                                             "tier: Read-only file system"):
            disk_store(disk)


def test_existing_store_mounted_read_only_fails_at_create(tmp_path):
    with disk_store(tmp_path / "src") as writer:
        dump_commit(writer, [b"old"], [block_data(0)])
    with mounted(tmp_path / "view", "--bind", str(tmp_path / "src")) as view:
        remount(view, "ro")
        with pytest.raises(ValueError, match="storage_backends: '.*/view' is not a writable directory for the Posix "
                                             "tier: Read-only file system"):
            disk_store(view, "Cache|Posix")


def test_nul_byte_in_the_directory_fails_at_create(tmp_path):
    with pytest.raises(ValueError, match="storage_backends: .* is not a writable directory .*null byte"):
        disk_store(Path(f"{tmp_path}/a\0b"))


def test_storage_turning_read_only_fails_commits_cleanly_while_loads_go_on(tmp_path, caplog):
    (tmp_path / "src").mkdir()
    with mounted(tmp_path / "view", "--bind", str(tmp_path / "src")) as view:
        root = view / "store"
        with disk_store(root) as store:
            dump_commit(store, ids(2, "before"), [block_data(i) for i in range(2)])
            remount(view, "ro")
            assert dump_commit(store, [b"during"], [block_data(2)]) == [False]
            assert "Read-only file system" in caplog.text and b"during".hex() in caplog.text
            status, out, _ = load_all(store, ids(2, "before"))
            assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(2)]))
            remount(view, "rw")
            assert dump_commit(store, [b"during"], [block_data(2)]) == [True]
        assert temp_files(root) == []


# ---- damaged block files on every read path ------------------------------------------------------------------
READ_PATHS = {  # name -> (pipeline of the reader, O_DIRECT)
    "posix": ("Posix", False),
    "cache-promote": ("Cache|Posix", False),
    "direct": ("Posix", True),
}
DAMAGES = ("bad-magic", "other-block", "header-length", "payload-length", "flipped-payload", "truncated")


def damage(raw: bytearray, kind: str, other: bytes) -> bytes:
    """``raw`` (a block file) damaged as ``kind`` says; ``other`` is another block's file."""
    if kind == "bad-magic":
        raw[0] ^= 0x01
    elif kind == "other-block":
        return other
    elif kind == "header-length":
        raw[8:12] = (128).to_bytes(4, "little")
    elif kind == "payload-length":
        raw[16:24] = (int.from_bytes(raw[16:24], "little") + 4096).to_bytes(8, "little")
    elif kind == "flipped-payload":
        raw[int.from_bytes(raw[8:12], "little") + 5000] ^= 0xFF
    else:
        return bytes(raw[:len(raw) // 2])
    return bytes(raw)


@pytest.mark.parametrize("path", READ_PATHS)
@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_block_file_fails_the_load_and_is_evicted(tmp_path, path, kind):
    pipeline, direct = READ_PATHS[path]
    root, keys = tmp_path / "store", [b"victim", b"other"]
    with disk_store(root, use_direct_io=direct) as writer:
        dump_commit(writer, keys, [block_data(0), block_data(1)])
    victim, other = (next(p for p in posix.block_files(root) if p.stem == block_key(k)) for k in keys)
    victim.write_bytes(damage(bytearray(victim.read_bytes()), kind, other.read_bytes()))
    with disk_store(root, pipeline, use_direct_io=direct) as store:
        assert store.lookup(keys) == [True, True]
        status, out, task = load_all(store, keys[:1])
        assert status == TaskStatus.FAILURE and bool((out == 7).all())
        cause = task.failures[keys[0]]
        assert str(victim) in cause and any(w in cause for w in ("bad header", "truncated", "CRC32", "expected"))
        assert not victim.exists() and store.lookup(keys) == [False, True]
        status, out, _ = load_all(store, keys[1:])
        assert status == TaskStatus.SUCCESS and torch.equal(out[0], block_data(1))
        assert dump_commit(store, keys[:1], [block_data(0)]) == [True]
        store.flush()
    with disk_store(root, use_direct_io=direct) as fresh:
        status, out, _ = load_all(fresh, keys[:1])
        assert status == TaskStatus.SUCCESS and torch.equal(out[0], block_data(0))


# ---- four processes writing the same blocks while another reads them --------------------------------------------
SHARED_BLOCKS, SHARED_BYTES, WRITERS = 16, 256 << 10, 4


def write_shared_blocks(roots: list[str], barrier: str) -> None:
    """One of the writers: the same blocks, same bytes, same order as the others, started together (each leaves a
    file in the directory ``barrier`` and waits for all of them)."""
    config = {"store_pipeline": "Posix" if len(roots) == 1 else "NFS", "storage_backends": roots}
    with make(config) as store:
        (Path(barrier) / str(os.getpid())).touch()
        while len(os.listdir(barrier)) < WRITERS:
            time.sleep(0.001)
        for i in range(SHARED_BLOCKS):
            assert dump_commit(store, ids(1, f"shared{i}-"), [block_data(i, SHARED_BYTES)]) == [True]


def read_until_done(store, keys: list[bytes], writers: subprocess.Popen) -> int:
    """Load every block lookup reports, again and again while ``writers`` run; each must load bit-exact. Returns the
    number of block loads checked."""
    checked = 0
    while writers.poll() is None:
        present = [i for i, hit in enumerate(store.lookup(keys)) if hit]
        if present:
            status, out, task = load_all(store, [keys[i] for i in present], SHARED_BYTES)
            assert status == TaskStatus.SUCCESS, task.describe_failures()
            assert all(torch.equal(got, block_data(i, SHARED_BYTES)) for i, got in zip(present, out))
            checked += len(present)
    return checked


@pytest.mark.parametrize("nroots", [1, 2])
def test_four_processes_writing_the_same_blocks_leave_one_whole_copy(tmp_path, nroots):
    roots = [str(tmp_path / f"root{r}") for r in range(nroots)]
    (tmp_path / "barrier").mkdir()
    keys = [ids(1, f"shared{i}-")[0] for i in range(SHARED_BLOCKS)]
    with make({"store_pipeline": "Posix" if nroots == 1 else "NFS", "storage_backends": roots}) as reader:
        writers = forked("write_shared_blocks", [(roots, str(tmp_path / "barrier"))] * WRITERS)
        try:
            read_until_done(reader, keys, writers)
            assert writers.wait() == 0
        finally:
            end_group(writers)
        status, out, _ = load_all(reader, keys, SHARED_BYTES)
        assert status == TaskStatus.SUCCESS
        assert torch.equal(out, torch.stack([block_data(i, SHARED_BYTES) for i in range(SHARED_BLOCKS)]))
    paths = [Path(r) for r in roots]
    assert sorted(p.stem for p in block_files(*paths)) == sorted(block_key(k) for k in keys)
    assert temp_files(*paths) == []


# ---- remote servers down, hung or slow ---------------------------------------------------------------------------
def timed(fn):
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def check_remote_down(store, secret: str = "") -> None:
    """Against an unreachable remote tier: misses, failed loads and a failed write-down, each within the bound,
    while the Cache serves; ``secret`` appears in no failure."""
    far, near = ids(3, "far"), [b"near"]
    hits, took = timed(lambda: store.lookup(far))
    assert hits == [False] * 3 and took < REMOTE_BOUND_S
    (status, _, task), took = timed(lambda: load_all(store, far))
    assert status == TaskStatus.FAILURE and len(task.failures) == 3 and took < REMOTE_BOUND_S
    assert dump_commit(store, near, [block_data(1)]) == [True]
    _, took = timed(store.flush)
    assert store.writeback_failures == 1 and took < REMOTE_BOUND_S
    status, out, _ = load_all(store, near)
    assert status == TaskStatus.SUCCESS and torch.equal(out[0], block_data(1))
    assert not secret or secret not in task.describe_failures()


def test_s3_server_down_at_start_gives_bounded_misses_and_never_shows_the_secret(caplog):
    caplog.set_level(logging.DEBUG)
    token = "session-token-do-not-log"
    config = {"store_pipeline": "Cache|DS3FS", "s3_bucket": "nowhere", "s3_endpoint": f"http://127.0.0.1:{free_port()}",
              "s3_region": "us-east-1", **S3_KEYS, "s3_session_token": token, **REMOTE}
    store, took = timed(lambda: make(config))
    assert took < REMOTE_BOUND_S
    check_remote_down(store, S3_KEYS["s3_secret_access_key"])
    _, took = timed(store.close)
    assert took < REMOTE_BOUND_S
    assert "DS3FS tier:" in caplog.text
    assert S3_KEYS["s3_secret_access_key"] not in caplog.text and token not in caplog.text


def test_mooncake_master_down_at_start_gives_bounded_misses():
    config = {"store_pipeline": "Cache|Mooncake", "mooncake_master": f"127.0.0.1:{free_port()}",
              "mooncake_local_hostname": "127.0.0.1", **REMOTE}
    store, took = timed(lambda: make(config))
    assert took < REMOTE_BOUND_S
    check_remote_down(store)
    _, took = timed(store.close)
    assert took < REMOTE_BOUND_S


@pytest.fixture
def slow_s3():
    """A moto S3 server behind a :class:`SlowProxy`: (config that reaches it through the proxy, the proxy)."""
    with MotoS3Server() as server, SlowProxy(server.port) as proxy:
        yield server.config(s3_endpoint=f"http://127.0.0.1:{proxy.port}", **REMOTE), proxy


def test_slow_s3_server_serves_within_the_timeout_and_misses_beyond_it(slow_s3):
    config, proxy = slow_s3
    keys = ids(3, "slow")
    with make(config) as writer:
        dump_commit(writer, keys, [block_data(i) for i in range(3)])
    with make(config) as store:
        proxy.delay = 0.05
        status, out, _ = load_all(store, keys[:1])
        assert status == TaskStatus.SUCCESS and torch.equal(out[0], block_data(0))
        proxy.delay = 4 * REMOTE["remote_timeout"]
        hits, took = timed(lambda: store.lookup(keys[1:]))
        assert hits == [False, False] and took < REMOTE_BOUND_S
        (status, _, _), took = timed(lambda: load_all(store, keys[1:]))
        assert status == TaskStatus.FAILURE and took < REMOTE_BOUND_S
        status, out, _ = load_all(store, keys[:1])
        assert status == TaskStatus.SUCCESS and torch.equal(out[0], block_data(0))
        proxy.delay = 0.0
        time.sleep(REMOTE["remote_retry_interval"])
        status, out, _ = load_all(store, keys[1:])
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(1), block_data(2)]))


def test_many_threads_against_a_hung_s3_server_all_return_within_the_bound():
    with MotoS3Server() as server:
        config = server.config(**REMOTE, max_concurrent_requests=4)
        with make(config) as writer:
            dump_commit(writer, ids(16, "hung"), [block_data(i) for i in range(16)])
        with make(config) as store:
            server.pause()
            answers, took = [], []

            def lookup(i: int) -> None:
                start = time.monotonic()
                answers.append(store.lookup(ids(16, "hung")[i:i + 1]))
                took.append(time.monotonic() - start)

            threads = [threading.Thread(target=lookup, args=(i,)) for i in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            server.resume()
    assert answers == [[False]] * 16 and max(took) < REMOTE_BOUND_S


# ---- an exhausted pinned pool ------------------------------------------------------------------------------------
POOL_BLOCK = 256 << 10


def small_pool_store(root: Path, *tiers_before_disk, alloc_timeout: float = 0.5, disk_class=PosixTier):
    pool = PinnedMemoryPool(1 << 20, 1 << 20)
    tiers = [tier(pool) for tier in tiers_before_disk]
    tiers.append(disk_class((str(root),)))
    return UcmPipelineStore(tiers, pool, alloc_timeout=alloc_timeout)


def stage(store, names: list[bytes], seed: int = 0):
    return store.wait(store.dump(names, 0, torch.stack([block_data(seed + i, POOL_BLOCK)
                                                         for i in range(len(names))])))


def test_full_pool_makes_a_dump_wait_for_a_release_then_fail_cleanly_after_the_timeout(tmp_path):
    # 2 s of patience: the release comes after the committed block's fsync, which took over 0.2 s once in a full run
    with small_pool_store(tmp_path / "store", alloc_timeout=2.0) as store:
        staged = ids(4, "staged")
        assert stage(store, staged) == TaskStatus.SUCCESS
        threading.Timer(0.3, store.commit, args=(staged[:1], [True])).start()
        status, took = timed(lambda: stage(store, [b"waits"], seed=10))
        assert status == TaskStatus.SUCCESS and 0.2 < took < 5
        task = store.dump([b"fails"], 0, block_data(11, POOL_BLOCK))
        assert store.wait(task) == TaskStatus.FAILURE and "pinned pool exhausted" in task.failures[b"fails"]
        assert store.commit([b"fails"], [True]) == [False]
        status, _, task = load_all(store, staged[:1], POOL_BLOCK)
        assert status == TaskStatus.FAILURE and "pinned pool exhausted" in task.describe_failures()
        assert store.commit(staged[1:] + [b"waits"], [True] * 4) == [True] * 4
        status, out, _ = load_all(store, staged + [b"waits"], POOL_BLOCK)
        assert status == TaskStatus.SUCCESS
        assert torch.equal(out, torch.stack([block_data(i, POOL_BLOCK) for i in (0, 1, 2, 3, 10)]))
        assert store.pool.get_stats()["currently_used"] == 0


def test_commit_that_finds_no_room_to_assemble_a_block_fails_and_frees_its_parts(tmp_path):
    with small_pool_store(tmp_path / "store") as store:
        layers = block_data(0, 2 * POOL_BLOCK).view(2, -1)
        for layer in range(2):
            store.wait(store.dump([b"layered"], layer * POOL_BLOCK, layers[layer]))
        assert stage(store, ids(2, "other")) == TaskStatus.SUCCESS
        assert store.commit([b"layered"], [True]) == [False]
        assert store.pool.get_stats()["currently_used"] == 2 * POOL_BLOCK
        assert store.commit(ids(2, "other"), [True, True]) == [True, True]
        for layer in range(2):
            store.wait(store.dump([b"layered"], layer * POOL_BLOCK, layers[layer]))
        assert store.commit([b"layered"], [True]) == [True]


class SlowPosix(PosixTier):
    """A real Posix tier whose writes take 0.2 s longer (a slow disk)."""

    def put(self, key, src):
        time.sleep(0.2)
        return super().put(key, src)


class SlowDirectPosix(SlowPosix):
    """The slow disk, written and read with O_DIRECT."""

    def __init__(self, roots):
        super().__init__(roots, use_direct_io=True)


def test_full_pool_of_blocks_awaiting_write_down_holds_dumps_back_until_they_are_written(tmp_path):
    with small_pool_store(tmp_path / "store", lambda pool: CacheTier(100, pool), alloc_timeout=10,
                          disk_class=SlowPosix) as store:
        names = ids(8, "wd")
        for i, name in enumerate(names):
            assert stage(store, [name], seed=i) == TaskStatus.SUCCESS
            assert store.commit([name], [True]) == [True]
        store.flush()
        assert store.pool.get_stats()["waits"] > 0  # some dump waited for a write-down to free its buffer
        assert store.writeback_failures == 0 and len(block_files(tmp_path / "store")) == 8
        status, out, _ = load_all(store, names, POOL_BLOCK)
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i, POOL_BLOCK)
                                                                             for i in range(8)]))


def test_direct_io_write_downs_and_loads_go_on_when_the_cache_fills_the_pool(tmp_path):
    """Concurrent promotions each hold a pool buffer for their block; their O_DIRECT bounces must not need a second
    (with bounces from the pool, 6 blocks in a 5-block pool failed a load about once in 40 rounds)."""
    for round_ in range(10):
        root = str(tmp_path / f"store{round_}")
        pool = PinnedMemoryPool(1 << 20, 1 << 20)
        disk = PosixTier((root,), use_direct_io=True)
        names = ids(6, "direct")
        with UcmPipelineStore([CacheTier(100, pool, alloc_timeout=2), disk], pool) as store:
            for i, name in enumerate(names):
                dump_commit(store, [name], [block_data(i, 200_000)])
                store.flush()
            assert store.writeback_failures == 0
            status, out, task = load_all(store, names, 200_000)
            assert status == TaskStatus.SUCCESS, task.describe_failures()
            assert torch.equal(out, torch.stack([block_data(i, 200_000) for i in range(6)]))


def test_direct_io_write_downs_go_on_when_blocks_awaiting_write_down_fill_the_pool(tmp_path):
    with small_pool_store(tmp_path / "store", lambda pool: CacheTier(100, pool), alloc_timeout=10,
                          disk_class=SlowDirectPosix) as store:
        names = ids(4, "full")  # 4 x 256 KiB: the whole 1 MiB pool, every block pinned until written down
        assert stage(store, names) == TaskStatus.SUCCESS
        assert store.commit(names, [True] * 4) == [True] * 4
        assert store.pool.get_stats()["currently_used"] == 1 << 20
        store.flush(timeout=30)
        assert store.writeback_failures == 0 and len(block_files(tmp_path / "store")) == 4


class BrokenPosix(PosixTier):
    """A real Posix tier that fails the writes of some blocks with an error that is not an OSError."""

    broken = {block_key(f"bad{i}".encode()) for i in range(3)}

    def _write_framed(self, fd, key, src):
        if key in self.broken:
            raise RuntimeError("injected: not an I/O error")
        super()._write_framed(fd, key, src)


def test_write_down_errors_of_any_kind_cost_their_blocks_never_the_writer_threads(tmp_path, caplog):
    pool = PinnedMemoryPool(16 << 20, 16 << 20)
    tiers = [CacheTier(100, pool), BrokenPosix((str(tmp_path / "store"),))]
    with UcmPipelineStore(tiers, pool) as store:
        names = ids(3, "bad") + ids(3, "good")
        dump_commit(store, names, [block_data(i) for i in range(6)])  # one commit: write-downs batched together
        store.flush(timeout=10)
        assert store.writeback_failures == 3 and "injected: not an I/O error" in caplog.text
        assert not os.listdir(tmp_path / "store" / "tmp")
        status, out, _ = load_all(store, names[3:])
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(3, 6)]))
    assert sorted(p.stem for p in block_files(tmp_path / "store")) == sorted(block_key(n) for n in names[3:])
