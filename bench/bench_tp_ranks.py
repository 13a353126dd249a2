"""Tensor-parallel ranks sharing one store: each rank offloads and loads its shard of a paged KV cache.

Every rank holds ``kv_heads / ranks`` heads of each block (its TP shard), hashes the same prompt under its own
namespace (``tp_size``, ``rank``), offloads its blocks through the kv_transfer path into one shared
``Cache|Posix`` store, then loads them back with a fresh store (from disk) into a fresh cache and checks them
bit-exact. Block ids of different ranks must be disjoint, so no rank can ever address another rank's shard.
Aggregate bandwidth = all ranks' bytes / the slowest rank's time, against the 1-rank figure measured in the same
run. Ranks are processes (torch.distributed: NCCL when every rank has a GPU of its own, else gloo); rank r uses
GPU r % n_gpus, so on a one-GPU machine several ranks share it, and on a CPU-only machine everything runs on the
CPU.

Usage: ``python -m bench.bench_tp_ranks --ranks 2 [--blocks 512] [--layers 32]``.
"""
import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.harness import row, write_results
from ucm_store.factory import UcmConnectorFactory
from ucm_store.hashing import BlockHasher, HashNamespace
from ucm_store.task import TaskStatus
from ucm_store.transport import CUDATransport


def rank_device(rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")


def shard_cache(args, rank: int, device: torch.device) -> list[torch.Tensor]:
    """This rank's per-layer caches ``(2, blocks, block_size, kv_heads / ranks, head_dim)`` of random bf16."""
    gen = torch.Generator().manual_seed(1000 + rank)
    shape = (2, args.blocks, args.block_size, args.kv_heads // args.ranks, args.head_dim)
    return [torch.randn(shape, generator=gen).bfloat16().to(device) for _ in range(args.layers)]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_rank(rank: int, args, port: int, results) -> None:
    device = rank_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    one_gpu_each = torch.cuda.is_available() and torch.cuda.device_count() >= args.ranks
    dist.init_process_group("nccl" if one_gpu_each else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks)
    transport = CUDATransport(device.index or 0)
    cache = shard_cache(args, rank, device)
    tokens = torch.randint(0, 32000, (args.blocks * args.block_size,), generator=torch.Generator().manual_seed(7))
    namespace = HashNamespace("bench-llama", "bfloat16", "flash_attn", args.block_size, tp_size=args.ranks, rank=rank)
    ids = BlockHasher(namespace).block_ids(tokens.tolist())
    all_ids = [None] * args.ranks
    dist.all_gather_object(all_ids, ids)
    disjoint = all(set(all_ids[r]).isdisjoint(all_ids[s]) for r in range(args.ranks) for s in range(r))
    config = {"store_pipeline": "Cache|Posix", "storage_backends": args.store, "cache_capacity": args.blocks,
              "max_pinned_size": 16 << 30}
    block_ids = list(range(args.blocks))
    with UcmConnectorFactory.create_connector(config, local_rank=rank) as store:
        rows = transport.get_pinned_buffer(args.blocks * row_bytes(cache))

        def offload():
            transport.synchronize(transport.offload_blocks(cache, block_ids, rows))
            assert store.wait(store.dump(ids, 0, rows.view(args.blocks, -1))) == TaskStatus.SUCCESS
            assert all(store.commit(ids, [True] * len(ids)))
            store.flush()

        dist.barrier()
        offload_s = timed(offload, device)
        transport.release_pinned_buffer(rows)
    dist.barrier()
    with UcmConnectorFactory.create_connector(config, local_rank=rank) as store:
        fresh = [torch.zeros_like(layer) for layer in cache]
        rows = transport.get_pinned_buffer(args.blocks * row_bytes(cache))

        def load():
            assert store.wait(store.load(ids, 0, rows.view(args.blocks, -1))) == TaskStatus.SUCCESS
            transport.synchronize(transport.load_blocks(rows, block_ids, fresh))

        load_s = timed(load, device)
        exact = all(torch.equal(a, b) for a, b in zip(cache, fresh))
        transport.release_pinned_buffer(rows)
    results[rank] = {"offload_s": offload_s, "load_s": load_s, "bytes": args.blocks * row_bytes(cache),
                     "exact": exact, "disjoint": disjoint, "device": str(device)}
    dist.barrier()
    dist.destroy_process_group()


def row_bytes(cache: list[torch.Tensor]) -> int:
    layer = cache[0]
    return len(cache) * layer.numel() // layer.shape[1] * layer.element_size()


def run(args, ranks: int) -> dict:
    args = argparse.Namespace(**{**vars(args), "ranks": ranks})
    args.store = tempfile.mkdtemp(prefix=f"ucm-tp{ranks}-", dir=args.dir)
    results = mp.Manager().dict()
    port = 29500 + os.getpid() % 1000 + ranks
    mp.spawn(run_rank, args=(args, port, results), nprocs=ranks, join=True)
    per_rank = [results[r] for r in range(ranks)]
    total = sum(r["bytes"] for r in per_rank)
    return {"ranks": per_rank, "offload_gbps": total / max(r["offload_s"] for r in per_rank) / 1e9,
            "load_gbps": total / max(r["load_s"] for r in per_rank) / 1e9,
            "exact": all(r["exact"] for r in per_rank), "disjoint": all(r["disjoint"] for r in per_rank)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dir", default=None, help="parent directory of the shared stores")
    args = parser.parse_args()
    if args.kv_heads % args.ranks:
        parser.error(f"--kv-heads {args.kv_heads} must be divisible by --ranks {args.ranks}")
    single, multi = run(args, 1), run(args, args.ranks)
    shape = (f"{args.layers} layers, {args.blocks} blocks of {args.block_size} tokens, {args.kv_heads} KV heads "
             f"split over ranks, head_dim {args.head_dim}, bf16")
    rows = []
    for result, impl in ((single, "ucm_1_rank"), (multi, f"ucm_{args.ranks}_ranks")):
        for name in ("offload", "load"):
            rows.append(row(f"{name}_through_shared_store", impl, shape, 1e3 * result["ranks"][0][f"{name}_s"],
                            aggregate_gbps=round(result[f"{name}_gbps"], 2), bit_exact=result["exact"],
                            ids_disjoint=result["disjoint"], devices=[r["device"] for r in result["ranks"]]))
    write_results("tp_ranks", rows, ceilings={"note": "1-rank run in the same process tree is the baseline"})
    print(f"1 rank: offload {single['offload_gbps']:.2f} GB/s, load {single['load_gbps']:.2f} GB/s; "
          f"{args.ranks} ranks: offload {multi['offload_gbps']:.2f} GB/s, load {multi['load_gbps']:.2f} GB/s "
          f"aggregate; bit-exact: {multi['exact'] and single['exact']}; ids disjoint across ranks: "
          f"{multi['disjoint']}; devices: {[r['device'] for r in multi['ranks']]}")
    return 0 if multi["exact"] and single["exact"] and multi["disjoint"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
