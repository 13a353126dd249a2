"""Store under load: N processes run a mixed stream of lookup / load / dump / commit calls against ONE storage
directory, then a fresh process loads every committed block back and checks it bit-exact.

Each worker (forked after the imports, so start-up is not measured) runs ``--ops`` calls on a ``Cache|Posix`` store:
45% ``lookup`` of one block of a key space shared by all workers, 35% ``load`` of one block it knows is committed (its
own commits and others' blocks its lookups found; every load is checked bit-exact on the spot and must succeed),
and ``dump`` of one block, with a ``commit`` of the pending dumps in one call once ``--batch`` are pending. Workers
draw their dumps from the same key space, so they commit the same blocks concurrently too. The timed phase runs from
the moment all workers are released together until the last one has flushed its write-downs to disk.

Baseline, same run, same op stream (unless ``--no-baseline``): the same workers over plain files (lookup = stat,
load = read, commit = temp file, write, fsync, rename, directory fsync for each pending block on as many threads as
the store's I/O workers), i.e. what the store does minus its checks, staging and tiers.

Workers are forked, so this process touches no CUDA before the runs (each worker sets up its own pinned pool).
Usage: ``python -m bench.bench_store_load [--processes 8] [--ops 20000] [--block-kib 16] [--dir DIR]``; JSON via
``bench.harness.write_results`` (``$OUT`` when set, else ``bench/results/``).
"""
import argparse
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.harness import row, write_results
from ucm_store.backends.posix import block_files
from ucm_store.factory import UcmConnectorFactory
from ucm_store.pool import PinnedMemoryPool
from ucm_store.task import TaskStatus

P_LOOKUP, P_LOAD = 0.45, 0.35  # the rest of the draws are dumps
KEY_SPACE_PER_PROCESS = 1000  # distinct blocks per worker in the key space all workers share
IO_WORKERS = 4
SOURCE_SEED = 1234


def block_id(key: int) -> bytes:
    return b"load-%d" % key


def block_bytes_of(source: torch.Tensor, key: int, nbytes: int) -> torch.Tensor:
    """Block ``key``'s content: a slice of the shared random ``source`` starting 64 * key bytes in, so every block
    differs from every other (a mix-up shows)."""
    start = (64 * key) % (source.numel() - nbytes)
    return source[start:start + nbytes]


def random_source(key_space: int, nbytes: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SOURCE_SEED)
    return torch.randint(0, 256, (64 * key_space + nbytes + 1,), dtype=torch.uint8, generator=gen)


class StoreClient:
    """The four calls of the mix on a UCM store; every failure raises."""

    def __init__(self, root: Path, nbytes: int):
        self.store = UcmConnectorFactory.create_connector(
            {"store_pipeline": "Cache|Posix", "storage_backends": str(root), "cache_capacity": 256,
             "pinned_pool_size": 64 << 20, "max_pinned_size": 256 << 20, "io_workers": IO_WORKERS}, 0)
        self.out = torch.empty(nbytes, dtype=torch.uint8)

    def lookup(self, key: int) -> bool:
        return self.store.lookup([block_id(key)])[0]

    def load(self, key: int) -> torch.Tensor:
        self.out.fill_(0x5A)
        task = self.store.load([block_id(key)], 0, self.out)
        if self.store.wait(task) != TaskStatus.SUCCESS:
            raise AssertionError(f"load of committed block {key} failed: {task.describe_failures()}")
        return self.out

    def dump(self, key: int, data: torch.Tensor) -> None:
        task = self.store.dump([block_id(key)], 0, data)
        if self.store.wait(task) != TaskStatus.SUCCESS:
            raise AssertionError(f"dump of block {key} failed: {task.describe_failures()}")

    def commit(self, keys: list[int]) -> list[bool]:
        return self.store.commit([block_id(k) for k in keys], [True] * len(keys))

    def close(self) -> None:
        self.store.close()


class RawFiles:
    """The baseline: the same calls over plain files in ``root`` (no checks, no staging, no tiers)."""

    def __init__(self, root: Path, nbytes: int):
        self.root = root
        self.pending: dict[int, torch.Tensor] = {}
        self.out = torch.empty(nbytes, dtype=torch.uint8)
        self.io = ThreadPoolExecutor(IO_WORKERS)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def lookup(self, key: int) -> bool:
        return (self.root / f"{key}.blk").exists()

    def load(self, key: int) -> torch.Tensor:
        with open(self.root / f"{key}.blk", "rb", buffering=0) as f:
            f.readinto(memoryview(self.out.numpy()))
        return self.out

    def dump(self, key: int, data: torch.Tensor) -> None:
        if not self.lookup(key):  # as the store: dumping a committed block is a no-op
            self.pending[key] = data.clone()

    def commit(self, keys: list[int]) -> list[bool]:
        return list(self.io.map(self._publish, keys))

    def _publish(self, key: int) -> bool:
        if key not in self.pending:
            return True
        tmp, final = self.root / "tmp" / f"{key}.{os.getpid()}", self.root / f"{key}.blk"
        with open(tmp, "wb", buffering=0) as f:
            f.write(memoryview(self.pending.pop(key).numpy()))
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fd = os.open(self.root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        return True

    def close(self) -> None:
        self.io.shutdown()


def run_worker(client, rank: int, args, source: torch.Tensor, key_space: int) -> dict:
    """``args.ops`` calls of the mix; returns counts, latencies (ms) and the keys this worker committed."""
    rng = random.Random(1000 + rank)
    known, pending, committed = [], [], []
    lat = {"lookup": [], "load": [], "dump": [], "commit": []}
    for _ in range(args.ops):
        draw, start = rng.random(), time.perf_counter()
        if len(pending) >= args.batch:
            kind, done = "commit", client.commit(pending)
            committed += [k for k, ok in zip(pending, done) if ok]
            known += [k for k, ok in zip(pending, done) if ok]
            pending = []
        elif P_LOOKUP <= draw < P_LOOKUP + P_LOAD and known:
            kind, key = "load", rng.choice(known)
            if not torch.equal(client.load(key), block_bytes_of(source, key, args.block_kib << 10)):
                raise AssertionError(f"block {key} loaded with wrong bytes")
        elif draw >= P_LOOKUP + P_LOAD and (key := rng.randrange(key_space)) not in pending:
            kind = "dump"
            client.dump(key, block_bytes_of(source, key, args.block_kib << 10))
            pending.append(key)
        else:
            kind, key = "lookup", rng.randrange(key_space)
            if client.lookup(key):
                known.append(key)
        lat[kind].append((time.perf_counter() - start) * 1e3)
    if pending:
        committed += [k for k, ok in zip(pending, client.commit(pending)) if ok]
    return {"counts": {k: len(v) for k, v in lat.items()}, "committed": committed,
            "p50_ms": {k: _pct(v, 50) for k, v in lat.items()}, "p99_ms": {k: _pct(v, 99) for k, v in lat.items()}}


def _pct(values: list[float], pct: int) -> float | None:
    return round(statistics.quantiles(values, n=100)[pct - 1], 4) if len(values) >= 2 else None


def _worker_main(impl: str, root: Path, rank: int, args, key_space: int, barrier, results) -> None:
    try:
        source = random_source(key_space, args.block_kib << 10)
        client = (StoreClient if impl == "ucm" else RawFiles)(root, args.block_kib << 10)
        barrier.wait()
        start = time.time()
        report = run_worker(client, rank, args, source, key_space)
        client.close()  # the store drains its write-downs to disk here: inside the timed phase
        results.put({"rank": rank, "start": start, "end": time.time(), **report})
    except BaseException as exc:
        results.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"})
        raise


def run_load(impl: str, root: Path, args) -> dict:
    """Fork ``args.processes`` workers of ``impl`` ("ucm" or "raw") on ``root``; their merged report."""
    key_space = KEY_SPACE_PER_PROCESS * args.processes
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(args.processes), ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(impl, root, rank, args, key_space, barrier, results))
             for rank in range(args.processes)]
    for proc in procs:
        proc.start()
    reports = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise RuntimeError(f"{impl} workers failed: {errors}")
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    ops = sum(sum(r["counts"].values()) for r in reports)
    counts = {k: sum(r["counts"][k] for r in reports) for k in reports[0]["counts"]}
    return {"impl": impl, "ops": ops, "wall_s": wall, "ops_per_s": ops / wall, "counts": counts,
            "committed": sorted({k for r in reports for k in r["committed"]}),
            "p50_ms": {k: max(r["p50_ms"][k] or 0 for r in reports) for k in counts},
            "p99_ms": {k: max(r["p99_ms"][k] or 0 for r in reports) for k in counts}}


def verify(root: Path, committed: list[int], block_kib: int, key_space: int) -> int:
    """Load every committed block in a fresh store and compare it bit-exact; check no temp file is left and one
    file per block exists. Returns the number of blocks checked."""
    nbytes, source = block_kib << 10, random_source(key_space, block_kib << 10)
    files = block_files(root)
    assert len(files) == len(committed), f"{len(files)} block files for {len(committed)} committed blocks"
    assert not any((root / "tmp").iterdir()), "temp files left behind"
    with UcmConnectorFactory.create_connector({"store_pipeline": "Posix", "storage_backends": str(root)}, 0) as store:
        for start in range(0, len(committed), 256):
            keys = committed[start:start + 256]
            out = torch.full((len(keys), nbytes), 0x5A, dtype=torch.uint8)
            task = store.load([block_id(k) for k in keys], 0, out)
            assert store.wait(task) == TaskStatus.SUCCESS, task.describe_failures()
            expected = torch.stack([block_bytes_of(source, k, nbytes) for k in keys])
            assert torch.equal(out, expected), f"blocks {keys[0]}..{keys[-1]} load back wrong"
    return len(committed)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--ops", type=int, default=20000, help="calls per process")
    parser.add_argument("--block-kib", type=int, default=16, help="block size in KiB")
    parser.add_argument("--batch", type=int, default=8, help="pending dumps that trigger one commit call")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-file baseline")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    pool = PinnedMemoryPool(4096, 4096, pinned=False)  # compile the pool's Numba functions once, before forking
    pool.release(pool.allocate(1))
    base = Path(tempfile.mkdtemp(prefix="ucm-bench-load-", dir=args.dir))
    shape = (f"{args.processes} processes x {args.ops} calls, {args.block_kib} KiB blocks, commit every "
             f"{args.batch} dumps, Cache|Posix")
    try:
        ucm = run_load("ucm", base / "ucm", args)
        runs = [ucm] + ([] if args.no_baseline else [run_load("raw", base / "raw", args)])
        checked = verify(base / "ucm", ucm["committed"], args.block_kib, KEY_SPACE_PER_PROCESS * args.processes)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [row("mixed_ops", r["impl"], shape, r["wall_s"] * 1e3, ops=r["ops"], ops_per_s=round(r["ops_per_s"], 1),
                counts=r["counts"], committed_blocks=len(r["committed"]), p50_ms=r["p50_ms"], p99_ms=r["p99_ms"])
            for r in runs]
    if len(runs) == 2:
        rows[0]["pct_of_raw"] = round(100 * ucm["ops_per_s"] / runs[1]["ops_per_s"], 1)
    path = write_results("store_load", rows, ceilings={"note": "baseline: plain files, same op stream, same run"},
                         extra={"verified_blocks": checked})
    for r in rows:
        print(f"{r['impl']:>4}: {r['ops']} calls in {r['median_ms'] / 1e3:.1f} s = {r['ops_per_s']:.0f} calls/s, "
              f"{r['committed_blocks']} blocks committed; p99 ms {r['p99_ms']}")
    print(f"verified {checked} committed blocks bit-exact in a fresh store; results: {path}")
    return path


if __name__ == "__main__":
    main()
