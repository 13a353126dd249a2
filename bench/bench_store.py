"""Store throughput on this machine's disk: Posix dump+commit and load against raw file I/O of the same bytes,
and Cache-tier loads against a plain memory copy, in one run.

Raw baselines use the same file count, sizes and directory: write + fsync + rename per file (what commit must
do to be crash-safe), and a plain read per file. Usage: ``python -m bench.bench_store [--blocks N] [--mib M]``.
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.harness import row, write_results
from ucm_store.factory import UcmConnectorFactory
from ucm_store.task import TaskStatus


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache (root only) so reads hit the disk; False if not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_write(root: Path, payloads: list[torch.Tensor], workers: int) -> None:
    """Baseline: temp file, write, fsync, rename; ``workers`` files at a time."""
    root.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        tmp, final = root / f"{i}.tmp", root / f"{i}.blk"
        with open(tmp, "wb", buffering=0) as f:
            f.write(memoryview(payloads[i].numpy()))
            os.fsync(f.fileno())
        os.rename(tmp, final)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(payloads))))


def raw_read(root: Path, outs: list[torch.Tensor], workers: int) -> None:
    def one(i: int) -> None:
        with open(root / f"{i}.blk", "rb", buffering=0) as f:
            f.readinto(memoryview(outs[i].numpy()))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(outs))))


def store_dump(store, ids: list[bytes], data: torch.Tensor) -> None:
    assert store.wait(store.dump(ids, 0, data)) == TaskStatus.SUCCESS
    assert all(store.commit(ids, [True] * len(ids)))
    store.flush()


def store_load(store, ids: list[bytes], out: torch.Tensor) -> None:
    assert store.wait(store.load(ids, 0, out)) == TaskStatus.SUCCESS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--mib", type=int, default=2, help="block size in MiB (2: a Llama-8B block, all layers)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    nbytes = args.mib << 20
    total = args.blocks * nbytes
    data = torch.randint(0, 256, (args.blocks, nbytes), dtype=torch.uint8)
    payloads = list(data)
    base = Path(args.dir or tempfile.mkdtemp(prefix="ucm-bench-store-"))
    shape = f"{args.blocks} blocks x {args.mib} MiB, {args.workers} io workers"
    cold = False
    results: dict[str, list[float]] = {k: [] for k in ("raw_w", "raw_r", "posix_w", "posix_r", "cache_r", "memcpy")}
    for rep in range(args.repeats):
        ids = [f"r{rep}-b{i}".encode() for i in range(args.blocks)]
        results["raw_w"].append(timed(lambda: raw_write(base / f"raw{rep}", payloads, args.workers)))
        outs = list(torch.zeros_like(data))  # pages touched before timing, as for every destination below
        cold = drop_page_cache()
        results["raw_r"].append(timed(lambda: raw_read(base / f"raw{rep}", outs, args.workers)))
        config = {"store_pipeline": "Posix", "storage_backends": str(base / f"ucm{rep}"), "io_workers": args.workers}
        with UcmConnectorFactory.create_connector(config, 0) as store:
            results["posix_w"].append(timed(lambda: store_dump(store, ids, data)))
            out = torch.zeros_like(data)
            drop_page_cache()
            results["posix_r"].append(timed(lambda: store_load(store, ids, out)))
            assert torch.equal(out, data)
        cache_config = {"store_pipeline": "Cache", "cache_capacity": args.blocks, "io_workers": args.workers}
        with UcmConnectorFactory.create_connector(cache_config, 0) as cache_store:
            store_dump(cache_store, ids, data)
            out = torch.zeros_like(data)
            results["cache_r"].append(timed(lambda: store_load(cache_store, ids, out)))
            assert torch.equal(out, data)
        results["memcpy"].append(timed(lambda: out.copy_(data)))
    shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    rows = [
        row("dump_commit", "raw_write_fsync_rename", shape, med["raw_w"], total),
        row("dump_commit", "ucm_posix", shape, med["posix_w"], total, baseline_ms=med["raw_w"],
            pct_of_raw=round(100 * med["raw_w"] / med["posix_w"], 1)),
        row("load", "raw_read", shape, med["raw_r"], total),
        row("load", "ucm_posix", shape, med["posix_r"], total, baseline_ms=med["raw_r"],
            pct_of_raw=round(100 * med["raw_r"] / med["posix_r"], 1)),
        row("load", "memcpy", shape, med["memcpy"], total),
        row("load", "ucm_cache", shape, med["cache_r"], total, baseline_ms=med["memcpy"],
            pct_of_raw=round(100 * med["memcpy"] / med["cache_r"], 1)),
    ]
    note = "raw file I/O and memcpy of the same bytes, same run; disk reads " + (
        "cold (page cache dropped before each read pass)" if cold else "WARM (page cache could not be dropped)")
    path = write_results("store", rows, ceilings={"note": note})
    for r in rows:
        extra = f"  {r['pct_of_raw']}% of baseline" if "pct_of_raw" in r else ""
        print(f"{r['name']:>12} {r['impl']:>24}: {r['median_ms']:9.1f} ms {r['gbps']:6.2f} GB/s{extra}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
