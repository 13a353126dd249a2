"""Prefix hit rate of the store on a multi-turn chat workload (the seed's section 6.1, as a workload).

Sessions share one system prompt; each turn's prompt is the conversation so far (system prompt, earlier user
messages and replies) plus a new user message, and the turns of all sessions arrive interleaved at random. As
the vLLM connector does, each request saves the full blocks of its prompt, so a turn can hit the blocks of the
earlier prompts of its session and the shared system prompt. Per request: hash the prompt into block ids
(``BlockHasher``), ``lookup_on_prefix``, load the hit blocks into a poisoned buffer and check them bit for bit
against the random bytes dumped for them (any mismatch fails the run), then dump and commit the missing blocks.

Stores: ``Cache`` (pinned DRAM only, LRU) and ``Cache|Posix`` (disk below) at cache capacities from 1/16 of the
workload's distinct blocks to all of them. Hit rate = prompt blocks served by the store / prompt blocks. In the
same run: the ceiling, the ideal hit rate (every block ever saved still there), and the baseline of no store
(0%). The disk tier keeps every block, so Cache|Posix hits the ceiling at any capacity; what changes is the
share of hits that the DRAM tier serves.

Usage: ``python -m bench.bench_hit_rate [--sessions 24] [--turns 6] [--block-kib 4] [--quick] [--dir DIR]``;
JSON under ``$OUT`` or ``bench/results/``.
"""
import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import row, write_results
from ucm_store.factory import UcmConnectorFactory
from ucm_store.hashing import BlockHasher, HashNamespace
from ucm_store.metrics import StatsMonitor
from ucm_store.task import TaskStatus

BLOCK_SIZE = 16
SYSTEM_TOKENS = 1024
MESSAGE_TOKENS = (64, 384)  # user message and reply lengths, uniform
POISON = 0xA5


def workload(sessions: int, turns: int, seed: int) -> list[list[int]]:
    """Prompts (token ids) in arrival order: every session's turns in order, sessions interleaved at random."""
    rng = random.Random(seed)
    system = [rng.randrange(32000) for _ in range(SYSTEM_TOKENS)]

    def message() -> list[int]:
        return [rng.randrange(32000) for _ in range(rng.randint(*MESSAGE_TOKENS))]

    histories, pending = [list(system) for _ in range(sessions)], []
    for s in range(sessions):
        pending += [s] * turns
    rng.shuffle(pending)
    prompts = []
    for s in pending:
        histories[s] += message()
        prompts.append(list(histories[s]))
        histories[s] += message()  # the reply, part of the next turn's prompt
    return prompts


def ideal_hit_rate(requests: list[list[bytes]]) -> float:
    """Hit rate of a store that never forgets: each request hits its longest prefix of blocks saved earlier."""
    saved: set[bytes] = set()
    hits = total = 0
    for ids in requests:
        run = next((i for i, b in enumerate(ids) if b not in saved), len(ids))
        hits, total = hits + run, total + len(ids)
        saved.update(ids)
    return hits / total


def serve(store, requests: list[list[bytes]], payload) -> dict:
    """Replay the requests against ``store``; hit rate, DRAM share of hits, lookup latencies, mismatches."""
    hits = total = mismatches = 0
    lookup_ms = []
    for ids in requests:
        start = time.perf_counter()
        run = store.lookup_on_prefix(ids) + 1
        lookup_ms.append((time.perf_counter() - start) * 1e3)
        if run:
            expected = torch.stack([payload(b) for b in ids[:run]])
            loaded = torch.full_like(expected, POISON)
            status = store.wait(store.load(ids[:run], 0, loaded))
            mismatches += status != TaskStatus.SUCCESS or not torch.equal(loaded, expected)
        if run < len(ids):
            missing = ids[run:]
            if store.wait(store.dump(missing, 0, torch.stack([payload(b) for b in missing]))) != TaskStatus.SUCCESS:
                raise RuntimeError("dump failed")
            store.commit(missing, [True] * len(missing))
        hits, total = hits + run, total + len(ids)
    return {"hit_rate": hits / total, "lookup_ms": statistics.median(lookup_ms), "mismatches": mismatches}


def run_config(pipeline: str, capacity: int, root: Path, requests: list[list[bytes]], payload) -> dict:
    """One fresh store of ``pipeline`` with ``capacity`` cache blocks, replaying ``requests``."""
    monitor = StatsMonitor.get_instance()
    monitor.reset()
    shutil.rmtree(root, ignore_errors=True)
    config = {"store_pipeline": pipeline, "storage_backends": str(root), "cache_capacity": capacity}
    with UcmConnectorFactory.create_connector(config, 0) as store:
        result = serve(store, requests, payload)
    tier_hits = monitor.get_stats()["tier_hits"]
    result["dram_hit_share"] = tier_hits.get("Cache", 0) / max(1, sum(tier_hits.values()))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=24)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--block-kib", type=int, default=4, help="bytes per block (KiB); hit rate does not depend "
                        "on it, the disk traffic does")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="4 sessions x 3 turns (seconds)")
    parser.add_argument("--dir", default=None, help="directory for the Posix tier (default: a temp dir)")
    args = parser.parse_args()
    sessions, turns = (4, 3) if args.quick else (args.sessions, args.turns)
    hasher = BlockHasher(HashNamespace("bench-llama", "bfloat16", "flash_attn", BLOCK_SIZE))
    requests = [hasher.block_ids(p) for p in workload(sessions, turns, args.seed)]
    distinct = sorted({b for ids in requests for b in ids})
    gen = torch.Generator().manual_seed(args.seed)
    table = dict(zip(distinct, torch.randint(0, 256, (len(distinct), args.block_kib << 10), dtype=torch.uint8,
                                             generator=gen)))
    ideal = ideal_hit_rate(requests)
    base = Path(args.dir or tempfile.mkdtemp(prefix="ucm-bench-hit-rate-"))
    capacities = sorted({max(1, len(distinct) // d) for d in (16, 8, 4, 2, 1)})
    shape = f"{sessions} sessions x {turns} turns, {len(requests)} requests, {len(distinct)} distinct blocks"
    print(f"workload: {shape}; ideal hit rate {ideal * 100:.1f}%")
    rows, failures = [], 0
    for pipeline in ("Cache", "Cache|Posix"):
        for cap in capacities:
            r = run_config(pipeline, cap, base / "posix", requests, table.__getitem__)
            failures += r["mismatches"]
            impl = "ucm_" + pipeline.lower().replace("|", "_")
            rows.append(row("prefix_hit_rate", impl, f"cache_capacity {cap} blocks; {shape}", r["lookup_ms"],
                            hit_rate=round(r["hit_rate"], 4), pct_of_ceiling=round(100 * r["hit_rate"] / ideal, 1),
                            dram_hit_share=round(r["dram_hit_share"], 4), cache_capacity=cap,
                            mismatches=r["mismatches"]))
            print(f"{pipeline:<12} cache_capacity {cap:>6}: hit rate {r['hit_rate'] * 100:5.1f}% "
                  f"({rows[-1]['pct_of_ceiling']}% of ideal), {r['dram_hit_share'] * 100:5.1f}% of hits from DRAM, "
                  f"lookup {r['lookup_ms']:.3f} ms, {r['mismatches']} bad loads")
    shutil.rmtree(base, ignore_errors=True)
    path = write_results("hit_rate", rows, ceilings={"ideal_hit_rate": round(ideal, 4), "no_store_hit_rate": 0.0},
                         extra={"workload": {"sessions": sessions, "turns": turns, "block_size": BLOCK_SIZE,
                                             "system_tokens": SYSTEM_TOKENS, "message_tokens": MESSAGE_TOKENS,
                                             "block_bytes": args.block_kib << 10, "seed": args.seed}})
    print(f"results: {path}")
    if failures:
        print(f"FAILED: {failures} loads returned wrong bytes")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
