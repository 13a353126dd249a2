"""Block hashing throughput on the host CPU: 1M tokens at block_size 16.

Ours (Numba chain, then ids as bytes) against the plain-Python twin and hashlib-SHA-256 chaining over the same
tokens, in one run. Usage: ``python bench/bench_hashing.py [--tokens N]``; JSON lands in ``bench/results/``.
"""
import argparse
import hashlib
import statistics
import time

import numpy as np

from bench.harness import row, write_results
from ucm_store.hashing import BlockHasher, HashNamespace, chain_hash_reference


def sha256_chain(tokens: np.ndarray, block_size: int, root: bytes) -> list[bytes]:
    """Baseline: parent digest + the block's int64 token bytes through SHA-256, block after block."""
    parent, out = root, []
    raw = tokens.astype("<i8").tobytes()
    step = block_size * 8
    for start in range(0, len(tokens) // block_size * step, step):
        parent = hashlib.sha256(parent + raw[start:start + step]).digest()
        out.append(parent)
    return out


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    hasher = BlockHasher(HashNamespace("bench-model", "bfloat16", "flash", args.block_size))
    tokens = np.random.default_rng(0).integers(0, 150_000, args.tokens)
    root = hasher.namespace.root()
    hi, lo = np.frombuffer(root, dtype="<u8")
    hasher.block_ids(tokens[:args.block_size])
    shape = f"{args.tokens} tokens, block_size {args.block_size}"
    ours_ms = median_ms(lambda: hasher.block_ids(tokens), 15)
    kernel_ms = median_ms(lambda: hasher.hash_array(tokens), 15)
    sha_ms = median_ms(lambda: sha256_chain(tokens, args.block_size, root), 5)
    twin_ms = median_ms(lambda: chain_hash_reference(tokens.tolist(), args.block_size, int(hi), int(lo)), 1)
    mtok = args.tokens / 1e6
    rows = [row("hash_to_ids", "ucm", shape, ours_ms, baseline_ms=sha_ms, mtokens_per_s=round(mtok / ours_ms * 1e3, 1)),
            row("hash_kernel_only", "ucm", shape, kernel_ms, mtokens_per_s=round(mtok / kernel_ms * 1e3, 1)),
            row("hash_to_ids", "hashlib_sha256_chain", shape, sha_ms, mtokens_per_s=round(mtok / sha_ms * 1e3, 1)),
            row("hash_to_ids", "python_twin", shape, twin_ms, mtokens_per_s=round(mtok / twin_ms * 1e3, 2))]
    path = write_results("hashing", rows, ceilings={}, extra={"target_ms": 20})
    for r in rows:
        print(f"{r['impl']:>22} {r['name']:>17}: {r['median_ms']:9.2f} ms  {r['mtokens_per_s']} Mtok/s")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
