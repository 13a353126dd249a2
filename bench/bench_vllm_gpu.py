"""The UCM connector inside GPU vLLM: correctness across processes, and TTFT against vLLM's OffloadingConnector.

Two parts, every vLLM in a fresh process (``--role`` runs one process; without it this script orchestrates):

1. Correctness (``correct``): a small Llama of seeded real-scale weights (``bench.llama_weights``: the next token
   depends on the whole prefix; a control prompt that differs only in its first block must answer differently).
   Process A computes the prompts with a cold ``Cache|Posix`` store; process B, fresh, loads them from the files.
   B must give A's tokens with >= 90% of full prompt blocks hit.
2. Speed (``ttft``): a Llama-8B-shaped dummy model (32 layers, 8 KV heads, head_dim 128). Per connector, one
   process: for each prompt, a cold pass, then vLLM's GPU prefix cache reset, then a warm pass (the connector's
   CPU tier serves it). Connectors: none (cold only: the baseline), vLLM's OffloadingConnector (the peer, as
   issue 16 measured it), UCM ``Cache|Posix``. Then a fresh UCM process on the same store: warm from the Posix
   tier (asynchronous loads). TTFT = latency of a 1-token generation. The pinned H2D ceiling is measured first (in
   this process, before any vLLM): ``kv_at_h2d_ceiling_ms`` is the time the full blocks' KV takes at that rate.

Usage (lent GPU, vLLM on PYTHONPATH): ``python3 -m bench.bench_vllm_gpu [--lengths 8192,16384,30720]
[--repeats 2]``; JSON to ``$OUT`` (or bench/results).
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: the connector's stats readable

SMALL_LLAMA = {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4,
               "num_hidden_layers": 4, "vocab_size": 4096}
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 65536}
BLOCK = 16
CORRECT_LENGTHS = (3001, 1200, 777, 2050)
UCM_STORE_KEYS = {"store_pipeline": "Cache|Posix", "pinned_pool_size": 24 << 30, "max_pinned_size": 24 << 30,
                  "cache_capacity": 12000}
OFFLOAD_BYTES = 24 << 30


def kv_transfer_config(connector: str, store: str):
    from vllm.config import KVTransferConfig

    if connector == "ucm":
        return KVTransferConfig(kv_connector="UCMConnector",
                                kv_connector_module_path="ucm.integration.vllm.ucm_connector", kv_role="kv_both",
                                kv_connector_extra_config={**UCM_STORE_KEYS, "storage_backends": store})
    if connector == "offload":
        return KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                                kv_connector_extra_config={"cpu_bytes_to_use": OFFLOAD_BYTES})
    return None


def make_llm(model_dir: str, connector: str, store: str, max_len: int, dummy: bool):
    from vllm import LLM

    return LLM(model=model_dir, load_format="dummy" if dummy else "auto", skip_tokenizer_init=True, dtype="bfloat16",
               block_size=BLOCK, max_model_len=max_len, max_num_batched_tokens=max_len, enforce_eager=True,
               gpu_memory_utilization=0.85, seed=0, kv_transfer_config=kv_transfer_config(connector, store))


def generate(llm, prompt: list[int], max_tokens: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    return time.perf_counter() - start, list(out.outputs[0].token_ids), out.num_cached_tokens


def connector_stats() -> dict:
    from ucm.shared.metrics.ucmmonitor import StatsMonitor

    return StatsMonitor.get_instance().get_stats()


def finish(result: dict) -> None:
    """Print the result, finish the connector's saves and write-downs, leave without vLLM's slow teardown."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    from ucm_store.writedown import drain_all

    print("UCM_RESULT " + json.dumps(result), flush=True)
    if has_kv_transfer_group():
        get_kv_transfer_group().shutdown()
    drain_all()
    os._exit(0)


# ---- one process ----------------------------------------------------------------------------------------------
def role_correct(args) -> None:
    prompts = json.loads(Path(args.prompts).read_text())
    llm = make_llm(args.model_dir, "ucm", args.store, 4096, dummy=False)
    outputs = [generate(llm, prompt, 16) for prompt in prompts]
    finish({"tokens": [o[1] for o in outputs], "cached_tokens": [o[2] for o in outputs], "stats": connector_stats()})


def role_ttft(args) -> None:
    from ucm_store.writedown import drain_all

    prompts = json.loads(Path(args.prompts).read_text())
    llm = make_llm(args.model_dir, args.connector, args.store, max(map(len, prompts)) + 64, dummy=True)
    generate(llm, [7] * 1000, 1)  # one untimed prompt first: first-use costs of kernels and allocators
    llm.reset_prefix_cache()
    rows = []
    for prompt in prompts:
        cold, _, cold_cached = generate(llm, prompt, 1)
        row = {"tokens": len(prompt), "cold_s": cold, "cold_cached": cold_cached}
        if args.warm:
            time.sleep(1.0)  # both connectors store in the background: let them finish
            llm.reset_prefix_cache()
            row["warm_s"], _, row["warm_cached"] = generate(llm, prompt, 1)
            drain_all()  # UCM's write-down to the files may still run after 1 s: a second warm pass
            llm.reset_prefix_cache()  # without it tells contention from a first-time cost
            row["warm_drained_s"], _, _ = generate(llm, prompt, 1)
        llm.reset_prefix_cache()
        rows.append(row)
    finish({"rows": rows, "stats": connector_stats() if args.connector == "ucm" else None})


# ---- orchestration --------------------------------------------------------------------------------------------
def run_role(*argv: str) -> dict:
    from bench.harness import run_bench_role

    return run_bench_role("bench.bench_vllm_gpu", *argv, timeout=900)


def check_correctness(work: Path) -> dict:
    """Process A (cold) then B (fresh, same store); the control prompt differs from prompt 0 in block 0 only."""
    from bench.harness import random_prompts
    from bench.llama_weights import write_llama

    model = write_llama(work / "small_llama", SMALL_LLAMA)
    prompts = random_prompts(CORRECT_LENGTHS, 1, SMALL_LLAMA["vocab_size"])
    control = [(t + 1) % SMALL_LLAMA["vocab_size"] if i < BLOCK else t for i, t in enumerate(prompts[0])]
    (work / "correct.json").write_text(json.dumps(prompts + [control]))
    common = ("--model-dir", str(model), "--store", str(work / "store_correct"),
              "--prompts", str(work / "correct.json"))
    first = run_role("--role", "correct", *common)
    second = run_role("--role", "correct", *common)
    full_blocks = sum((len(p) - 1) // BLOCK for p in prompts)
    hit_blocks = sum(c // BLOCK for c in second["cached_tokens"][:len(prompts)])
    return {"same_tokens": first["tokens"][:len(prompts)] == second["tokens"][:len(prompts)],
            "control_differs": first["tokens"][-1] != first["tokens"][0],
            "full_prompt_blocks": full_blocks, "hit_blocks": hit_blocks, "hit_fraction": hit_blocks / full_blocks,
            "a_tokens": first["tokens"], "b_tokens": second["tokens"], "b_stats": second["stats"]}


def measure_ttft(work: Path, lengths: list[int], repeats: int) -> dict:
    from bench.harness import random_prompts
    from bench.llama_weights import LLAMA_DEFAULTS

    model = work / "llama8b"  # config only: vLLM's dummy loader fills the weights
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({**LLAMA_DEFAULTS, **LLAMA_8B, "rope_theta": 500000.0}))
    prompts = random_prompts([n for n in lengths for _ in range(repeats)], 2, LLAMA_8B["vocab_size"])
    (work / "ttft.json").write_text(json.dumps(prompts))
    store = str(work / "store_ttft")
    common = ("--model-dir", str(model), "--prompts", str(work / "ttft.json"))
    runs = {"none": run_role("--role", "ttft", "--connector", "none", "--store", store, *common),
            "offload": run_role("--role", "ttft", "--connector", "offload", "--warm", "--store", store, *common),
            "ucm": run_role("--role", "ttft", "--connector", "ucm", "--warm", "--store", store, *common)}
    runs["files_before_fresh"] = sum(1 for path in Path(store).rglob("*") if path.is_file())
    runs["ucm_fresh_posix"] = run_role("--role", "ttft", "--connector", "ucm", "--store", store, *common)
    return runs


def kv_bytes(tokens: int) -> int:
    """Bytes of KV of the full blocks of a ``tokens``-token prompt on the Llama-8B-shaped model (bf16)."""
    head_dim = LLAMA_8B["hidden_size"] // LLAMA_8B["num_attention_heads"]
    per_token = LLAMA_8B["num_hidden_layers"] * 2 * LLAMA_8B["num_key_value_heads"] * head_dim * 2
    return tokens // BLOCK * BLOCK * per_token


def summarize(runs: dict, lengths: list[int], h2d_gbps: float) -> list[dict]:
    """Median TTFT per length and configuration, with the ratios the issue asks for and the time the full blocks'
    KV takes at the pinned H2D ceiling measured in the same run."""
    def median(run: str, key: str, n: int) -> float:
        return statistics.median(r[key] for r in runs[run]["rows"] if r["tokens"] == n) * 1e3

    rows = []
    for n in lengths:
        none_ms = median("none", "cold_s", n)
        entry = {"tokens": n, "none_cold_ms": round(none_ms, 1)}
        for run in ("offload", "ucm"):
            entry[f"{run}_cold_ms"] = round(median(run, "cold_s", n), 1)
            entry[f"{run}_warm_ms"] = round(median(run, "warm_s", n), 1)
            entry[f"{run}_warm_drained_ms"] = round(median(run, "warm_drained_s", n), 1)
            entry[f"{run}_cold_overhead_pct"] = round(100 * (entry[f"{run}_cold_ms"] / none_ms - 1), 1)
        entry["ucm_fresh_posix_ms"] = round(median("ucm_fresh_posix", "cold_s", n), 1)
        entry["ucm_warm_vs_peer"] = round(entry["ucm_warm_ms"] / entry["offload_warm_ms"], 3)
        entry["kv_at_h2d_ceiling_ms"] = round(kv_bytes(n) / h2d_gbps / 1e6, 1)
        rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("correct", "ttft"))
    parser.add_argument("--model-dir")
    parser.add_argument("--store")
    parser.add_argument("--prompts")
    parser.add_argument("--connector", default="ucm", choices=("ucm", "offload", "none"))
    parser.add_argument("--warm", action="store_true", help="ttft: a warm pass after each cold one")
    parser.add_argument("--lengths", default="8192,16384,30720")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: correct, ttft")
    args = parser.parse_args()
    if args.role:
        {"correct": role_correct, "ttft": role_ttft}[args.role](args)
        return
    from bench.harness import measure_copy_ceilings, write_results

    ceilings = measure_copy_ceilings()
    print(json.dumps(ceilings), flush=True)
    lengths = [int(n) for n in args.lengths.split(",")]
    extra = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("UCM_BENCH_TMP", "/tmp")) as tmp:
        work = Path(tmp)
        if "correct" not in args.skip:
            extra["correctness"] = check_correctness(work)
            print(json.dumps({k: v for k, v in extra["correctness"].items() if k not in ("a_tokens", "b_tokens")}),
                  flush=True)
        if "ttft" not in args.skip:
            runs = measure_ttft(work, lengths, args.repeats)
            extra["runs"] = runs
            rows = summarize(runs, lengths, ceilings["h2d_pinned_gbps"])
            for entry in rows:
                print(json.dumps(entry), flush=True)
        else:
            rows = []
    import vllm
    extra["vllm"] = vllm.__version__
    print(write_results("vllm_gpu", rows, ceilings, extra))


if __name__ == "__main__":
    main()
