"""Shared tiers on loopback: dump+commit+flush and load throughput of ``Cache|DS3FS`` (on a moto S3 server) and
``Cache|Mooncake`` (master + one storage node, TCP) against ``Cache|Posix`` (this machine's disk), in one run.

Save = dump, commit and flush (every block written down to the tier); load = a fresh store (empty Cache) loading
the blocks from the tier. Each repeat uses new block ids (committed blocks are immutable). Before timing, every
backend round-trips random bf16 blocks into NaN-poisoned outputs and must match exactly. Also in the same run: the
S3 client choice (obstore vs boto3, one object at a time on the same server; wall time and client CPU time) and two
ceilings: loopback TCP throughput and a memory copy. moto is a Python server and limits DS3FS here: its figures
compare clients and check the path, they are not what a real S3 endpoint gives.

Backends whose packages are missing are skipped and listed in the JSON. Usage:
``python -m bench.bench_remote_tiers [--blocks N] [--mib M] [--repeats R]``.
"""
import argparse
import importlib
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.harness import row, write_results
from ucm_store.factory import UcmConnectorFactory
from ucm_store.task import TaskStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import S3_BUCKET, MooncakeServers, MotoS3Server  # noqa: E402

GB = 1e9


def blocks(n: int, nbytes: int, seed: int) -> torch.Tensor:
    """``n`` random bf16 blocks of ``nbytes`` each (no NaN), as one (n, nbytes // 2) tensor."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, nbytes // 2, generator=gen).to(torch.bfloat16)


def block_ids(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(n)]


def save(config: dict, ids: list[bytes], data: torch.Tensor) -> float:
    """Seconds to dump, commit and flush ``data`` as blocks ``ids`` through a new store."""
    with UcmConnectorFactory.create_connector(config) as store:
        start = time.perf_counter()
        task = store.dump(ids, 0, data)
        assert store.wait(task) == TaskStatus.SUCCESS, task.describe_failures()
        assert all(store.commit(ids, [True] * len(ids)))
        store.flush()
        elapsed = time.perf_counter() - start
        assert store.writeback_failures == 0
    return elapsed


def load(config: dict, ids: list[bytes], out: torch.Tensor) -> float:
    """Seconds for a new store (empty Cache) to load blocks ``ids`` from the tier into ``out``."""
    with UcmConnectorFactory.create_connector(config) as store:
        start = time.perf_counter()
        task = store.load(ids, 0, out)
        assert store.wait(task) == TaskStatus.SUCCESS, task.describe_failures()
        return time.perf_counter() - start


def check_round_trip(name: str, config: dict, n: int, nbytes: int) -> None:
    data = blocks(n, nbytes, seed=1)
    out = torch.full_like(data, float("nan"))
    save(config, block_ids(f"{name}-check", n), data)
    load(config, block_ids(f"{name}-check", n), out)
    assert torch.equal(out.view(torch.int16), data.view(torch.int16)), f"{name}: loaded blocks differ"


def tier_rows(name: str, config: dict, n: int, nbytes: int, repeats: int) -> list[dict]:
    check_round_trip(name, config, min(n, 8), nbytes)
    data = blocks(n, nbytes, seed=2)
    out = torch.empty_like(data)
    saves, loads = [], []
    for r in range(repeats):
        ids = block_ids(f"{name}-{r}", n)
        saves.append(save(config, ids, data))
        loads.append(load(config, ids, out))
    shape = f"{n} blocks x {nbytes >> 20} MiB"
    return [row("dump_commit_flush", name, shape, statistics.median(saves) * 1e3, nbytes * n),
            row("load_fresh_store", name, shape, statistics.median(loads) * 1e3, nbytes * n)]


def s3_client_rows(server: MotoS3Server, n: int, nbytes: int, repeats: int) -> list[dict]:
    """obstore vs boto3 on the same server: one object at a time, wall and client CPU seconds per GB."""
    import boto3
    import obstore
    from obstore.store import S3Store

    keys = {"aws_access_key_id": "AKIAUCMTEST", "aws_secret_access_key": "ucm-test-secret-do-not-log"}
    b3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1", **keys)
    ob = S3Store(S3_BUCKET, config={"endpoint": server.endpoint, "region": "us-east-1",
                                    "access_key_id": keys["aws_access_key_id"],
                                    "secret_access_key": keys["aws_secret_access_key"]},
                 client_options={"allow_http": True})
    payload = os.urandom(nbytes)
    clients = {"obstore": (lambda k: obstore.put(ob, k, payload), lambda k: bytes(obstore.get(ob, k).bytes())),
               "boto3": (lambda k: b3.put_object(Bucket=S3_BUCKET, Key=k, Body=payload),
                         lambda k: b3.get_object(Bucket=S3_BUCKET, Key=k)["Body"].read())}
    rows = []
    for impl, (put, get) in clients.items():
        put(f"client/{impl}/check")
        assert get(f"client/{impl}/check") == payload, f"{impl}: object read back differs"
        for op, fn in (("put", put), ("get", get)):
            walls, cpus = [], []
            for r in range(repeats):
                names = [f"client/{impl}/{r}/{i}" for i in range(n)]
                if op == "get":
                    for name in names:
                        put(name)
                wall, cpu = time.perf_counter(), time.process_time()
                for name in names:
                    fn(name)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            rows.append(row(f"s3_client_{op}", impl, f"{n} objects x {nbytes >> 20} MiB, one at a time",
                            statistics.median(walls) * 1e3, nbytes * n,
                            client_cpu_s_per_gb=round(statistics.median(cpus) / (nbytes * n / GB), 3)))
    return rows


def missing_modules(*names: str) -> str:
    """Why the modules ``names`` cannot be imported here ("" when they all can)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{name}: {exc}"
    return ""


def loopback_tcp_gbps(nbytes: int = 512 << 20, chunk: int = 4 << 20) -> float:
    """One TCP stream over 127.0.0.1, sender and receiver threads in this process."""
    listener = socket.create_server(("127.0.0.1", 0))
    buf = bytearray(chunk)

    def receive():
        conn, _ = listener.accept()
        view, left = memoryview(bytearray(chunk)), nbytes
        while left:
            left -= conn.recv_into(view, min(chunk, left))
        conn.close()

    receiver = threading.Thread(target=receive)
    receiver.start()
    start = time.perf_counter()
    with socket.create_connection(listener.getsockname()) as sender:
        for _ in range(nbytes // chunk):
            sender.sendall(buf)
    receiver.join()
    listener.close()
    return nbytes / (time.perf_counter() - start) / GB


def memcpy_gbps(nbytes: int = 256 << 20) -> float:
    src, dst = torch.randint(0, 255, (nbytes,), dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--mib", type=int, default=2, help="MiB per block (2: Llama-3.1-8B, all layers, 16 tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, nbytes = args.blocks, args.mib << 20
    rows, skipped = [], {}
    ceilings = {"loopback_tcp_gbps": round(loopback_tcp_gbps(), 2), "memcpy_gbps": round(memcpy_gbps(), 2)}
    with tempfile.TemporaryDirectory(prefix="ucm-bench-posix-") as root:
        rows += tier_rows("Cache|Posix", {"store_pipeline": "Cache|Posix", "storage_backends": root}, n, nbytes,
                          args.repeats)
    if missing := missing_modules("moto", "obstore", "boto3"):
        skipped["Cache|DS3FS"] = missing
    else:
        with MotoS3Server() as server:
            rows += tier_rows("Cache|DS3FS", server.config(), n, nbytes, args.repeats)
            rows += s3_client_rows(server, n, nbytes, args.repeats)
    if missing := missing_modules("mooncake.store"):
        skipped["Cache|Mooncake"] = missing
    else:
        with MooncakeServers(segment_bytes=max(2 * n * nbytes * (args.repeats + 1), 256 << 20)) as servers:
            rows += tier_rows("Cache|Mooncake", servers.config(), n, nbytes, args.repeats)
    path = write_results("remote_tiers", rows, ceilings,
                         extra={"cpu_cores": os.cpu_count(), "skipped": skipped,
                                "note": "loopback; moto is a Python S3 server, not a real endpoint"})
    print(f"ceilings: {ceilings}  skipped: {list(skipped) or 'none'}")
    print(f"{'name':<20} {'impl':<16} {'shape':<40} {'ms':>9} {'GB/s':>7}  extra")
    for r in rows:
        extra = f"cpu s/GB {r['client_cpu_s_per_gb']}" if "client_cpu_s_per_gb" in r else ""
        print(f"{r['name']:<20} {r['impl']:<16} {r['shape']:<40} {r['median_ms']:>9.1f} {r['gbps']:>7.3f}  {extra}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
