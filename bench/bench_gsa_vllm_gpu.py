"""GSA inside GPU vLLM: decode tokens/s against vLLM's own dense FlashAttention, and agreement with its answers.

Every vLLM runs in a fresh process (``--role``; without it this script orchestrates), CUDA graphs on (vLLM's
default), in-process engine so the GSA backend's counters are readable. Configurations:

* ``dense``: no connector: vLLM's FlashAttention backend untouched (the peer);
* ``gsa10``: the UCM connector with ``ucm_sparse_method: GSA``, ``sparse_ratio: 1.0`` (must equal dense exactly);
* ``gsa03``: the same at ``sparse_ratio: 0.3``; ``gsa03_fp8``: with fp8 block summaries (``repr_dtype: fp8``);
* ``gsa03_d2``: ``sparse_ratio: 0.3`` with the first two decoder layers dense (vLLM's FlashAttention there);
* ``gsa03_r4``: ``sparse_ratio: 0.3`` with ``select_every: 4`` (each request's lists reused for up to 4 steps);
* ``gsa_all`` (agreement only): GSA's whole path (summaries, selection, sparse kernel, CUDA graphs) with a token
  budget above every context, so it selects every block: equal to dense up to the kernels' rounding.

The connector runs as ``kv_role: kv_consumer`` (loads only: the store is empty, no prompt block is saved), so
the decode timings carry no save traffic.

1. Speed: a Llama-8B-shaped dummy-weight model (hidden 4096, 32 / 8 heads, head_dim 128; ``--layers`` decoder
   layers, default 8: 128K x 8 contexts of all 32 layers need 128 GiB of KV, more than the H200 holds beside the
   weights; per layer, attention's and the weights' shares of a step are those of the 32-layer model). Per
   context and batch: one generation of 1 token (the prefill), then the same prompts again for ``1 + --decode``
   tokens (prefix-cache hit, then the decode steps) one engine step at a time: decode tokens/s = batch / the
   median step time (host work included, as a server pays it). The ceiling beside it: a dense step that only
   read its KV and weights once at the HBM read rate measured in the same run.
2. Agreement on a model whose answers depend on its KV: seeded real-scale random weights (``bench.llama_weights``),
   prompts of 3-6K tokens, 24 greedy tokens: the share of positions equal to dense's, whether the whole
   continuation is identical, and every position's two most likely tokens with their logprobs (a flip between
   near-tied tokens is rounding; a flip with a wide margin is not).

Usage (lent GPU, vLLM on PYTHONPATH): ``python3 -m bench.bench_gsa_vllm_gpu [--contexts 32768,131072]
[--batches 1,8] [--layers 8] [--decode 64]``; JSON to ``$OUT`` (or bench/results).
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
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: GSA's counters readable

LLAMA_8B_SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 32000, "rope_theta": 500000.0}
REAL_LLAMA = {"hidden_size": 1024, "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 2,
              "num_hidden_layers": 4, "vocab_size": 4096}
AGREEMENT_LENGTHS = (3072, 4000, 5000, 6000)
AGREEMENT_TOKENS = 24
BLOCK = 16
CONFIGS = {"dense": None, "gsa10": {"sparse_ratio": 1.0}, "gsa03": {"sparse_ratio": 0.3},
           "gsa03_fp8": {"sparse_ratio": 0.3, "repr_dtype": "fp8"}, "gsa_all": {"token_budget": 1 << 20},
           "gsa03_d2": {"sparse_ratio": 0.3, "dense_first_layers": 2},
           "gsa03_r4": {"sparse_ratio": 0.3, "select_every": 4}}
SPEED_CONFIGS = ("dense", "gsa10", "gsa03", "gsa03_fp8")


def kv_transfer_config(config: str, store: str):
    """The UCM connector carrying the GSA config of ``config`` (loads only), or None for vLLM's dense run."""
    from vllm.config import KVTransferConfig

    sparse = CONFIGS[config]
    if sparse is None:
        return None
    extra = {"store_pipeline": "Cache", "storage_backends": store, "ucm_sparse_method": "GSA",
             "ucm_sparse_config": {"GSA": sparse}}
    return KVTransferConfig(kv_connector="UCMConnector", kv_connector_module_path="ucm.integration.vllm.ucm_connector",
                            kv_role="kv_consumer", kv_connector_extra_config=extra)


def make_llm(args, max_len: int, dummy: bool):
    from vllm import LLM

    from ucm_sparse.vllm.plugin import register

    register()  # the project is not pip-installed on the GPU host: its entry point would not run
    return LLM(model=args.model_dir, load_format="dummy" if dummy else "auto", skip_tokenizer_init=True,
               dtype="bfloat16", block_size=BLOCK, max_model_len=max_len, max_num_batched_tokens=32768,
               max_num_seqs=max(8, args.max_batch), gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
               kv_transfer_config=kv_transfer_config(args.config, args.store))


def generate(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Greedy generation of ``max_tokens`` per prompt: (seconds, the tokens of each)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]


def gsa_counters() -> dict:
    from ucm_sparse.vllm.gpu_backend import stats

    return {"steps": stats.steps, "sparse_rows": stats.sparse_rows}


def finish(result: dict) -> None:
    print("UCM_RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # skip vLLM's slow teardown


# ---- one process ----------------------------------------------------------------------------------------------
def decode_steps(llm, prompts: list[list[int]], steps: int, profiler=None) -> tuple[list[float], list[list[int]]]:
    """Run ``prompts`` (their KV in vLLM's prefix cache already) for ``1 + steps`` tokens one engine step at a
    time: (seconds of every step, the tokens of each prompt). The first step recomputes each prompt's last
    block; the rest decode. ``profiler`` (a torch profiler) is started after the first two steps."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=1 + steps, ignore_eos=True, detokenize=False)
    ids = [f"steps-{len(prompts)}-{len(p)}-{i}" for i, p in enumerate(prompts)]
    for req_id, prompt in zip(ids, prompts):
        engine.add_request(req_id, TokensPrompt(prompt_token_ids=prompt), params)
    times, tokens = [], {}
    while engine.has_unfinished_requests():
        if profiler is not None and len(times) == 2:
            profiler.start()
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        tokens.update((o.request_id, list(o.outputs[0].token_ids)) for o in outputs if o.finished)
    if profiler is not None:
        profiler.stop()
    return times, [tokens[req_id] for req_id in ids]


def profile_decode(llm, prompts: list[list[int]], steps: int) -> list[dict]:
    """GPU kernels of ``steps`` steady decode steps under torch's profiler (the prefix-hit step, which refreshes
    every block's summaries, and the first decode step are left out): the 12 with the most device time, in
    microseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    decode_steps(llm, prompts, steps + 1, profiler=prof)
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "calls_per_step": e.count / steps,
             "us_per_step": round(e.self_device_time_total / steps, 1)} for e in kernels[:12]]


def role_speed(args) -> None:
    """Per (context, batch): the prefill's seconds, the decode step's median time and tokens/s, the tokens."""
    from bench.harness import random_prompts

    contexts = [int(n) for n in args.contexts.split(",")]
    batches = [int(n) for n in args.batches.split(",")]
    llm = make_llm(args, max(contexts) + args.decode + 2 * BLOCK, dummy=True)
    generate(llm, [[7] * 2000], 8)  # first-use costs of kernels and allocators, untimed
    rows = []
    for context in contexts:
        prompts = random_prompts([context] * max(batches), seed=context, vocab=LLAMA_8B_SHAPE["vocab_size"])
        for batch in batches:
            prefill_s, _ = generate(llm, prompts[:batch], 1)
            before = gsa_counters()
            times, tokens = decode_steps(llm, prompts[:batch], args.decode)
            after = gsa_counters()
            decode = times[2:-1]  # steady state: past the prefix-hit step and the first decode, before the last
            step_s = statistics.median(decode)
            rows.append({"context": context, "batch": batch, "prefill_s": prefill_s, "step_ms": step_s * 1e3,
                         "mean_step_ms": statistics.mean(decode) * 1e3, "decode_tokens_per_s": batch / step_s,
                         "steps": len(times), "tokens": tokens, "gsa_steps": after["steps"] - before["steps"],
                         "gsa_rows": after["sparse_rows"] - before["sparse_rows"]})
            if args.profile_steps:
                rows[-1]["profile"] = profile_decode(llm, prompts[:batch], args.profile_steps)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
        llm.reset_prefix_cache()
    finish({"rows": rows})


def top2_per_position(llm, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[list]]:
    """Greedy generation with the two most likely tokens of every position: (tokens per prompt, per prompt and
    position ``[[token, logprob], [token, logprob]]``), to tell a rounding flip (a near tie) from a real change."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False, logprobs=2)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    tops = [[sorted(([t, lp.logprob] for t, lp in position.items()), key=lambda x: -x[1])[:2]
             for position in o.outputs[0].logprobs] for o in outputs]
    return [list(o.outputs[0].token_ids) for o in outputs], tops


def role_agree(args) -> None:
    from bench.harness import random_prompts

    prompts = random_prompts(AGREEMENT_LENGTHS, seed=3, vocab=REAL_LLAMA["vocab_size"])
    llm = make_llm(args, max(AGREEMENT_LENGTHS) + AGREEMENT_TOKENS + BLOCK, dummy=False)
    before = gsa_counters()
    tokens, top2 = top2_per_position(llm, prompts, AGREEMENT_TOKENS)
    after = gsa_counters()
    finish({"tokens": tokens, "top2": top2, "gsa_steps": after["steps"] - before["steps"]})


# ---- orchestration --------------------------------------------------------------------------------------------
def run_role(*argv: str) -> dict:
    from bench.harness import run_bench_role

    return run_bench_role("bench.bench_gsa_vllm_gpu", *argv, timeout=600, echo=True)


def agreement(tokens: list[list[int]], dense: list[list[int]]) -> dict:
    """Position-wise agreement of greedy continuations with dense's, and how many are identical."""
    shares = [sum(a == b for a, b in zip(mine, ref)) / len(ref) for mine, ref in zip(tokens, dense)]
    return {"position_agreement": round(statistics.mean(shares), 4), "per_prompt": [round(x, 4) for x in shares],
            "identical": sum(mine == ref for mine, ref in zip(tokens, dense)), "prompts": len(dense)}


def write_model(folder: Path, layers: int, max_len: int) -> Path:
    from bench.llama_weights import LLAMA_DEFAULTS

    folder.mkdir(exist_ok=True)  # config only: vLLM's dummy loader fills the weights
    config = {**LLAMA_DEFAULTS, **LLAMA_8B_SHAPE, "num_hidden_layers": layers, "max_position_embeddings": max_len}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def dense_step_bytes(context: int, batch: int, layers: int) -> int:
    """Bytes a dense decode step must read on the Llama-8B-shaped model: every row's KV and every weight (bf16)."""
    hidden, inter = LLAMA_8B_SHAPE["hidden_size"], LLAMA_8B_SHAPE["intermediate_size"]
    kv_width = LLAMA_8B_SHAPE["num_key_value_heads"] * hidden // LLAMA_8B_SHAPE["num_attention_heads"]
    layer_params = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * inter
    weights = layers * layer_params + LLAMA_8B_SHAPE["vocab_size"] * hidden  # lm_head (embedding: a row each)
    return 2 * (weights + batch * context * layers * 2 * kv_width)


def speed_rows(runs: dict, layers: int, read_gbps: float) -> list[dict]:
    """Per (context, batch): each config's decode tokens/s, GSA's speed-up over dense, agreement with dense, and
    the dense ceiling: the tokens/s if a step took only the time of reading its bytes once at the HBM read rate."""
    rows = []
    for i, dense in enumerate(runs["dense"]["rows"]):
        context, batch = dense["context"], dense["batch"]
        floor_s = dense_step_bytes(context, batch, layers) / (read_gbps * 1e9)
        entry = {"context": context, "batch": batch, "dense_ceiling_tok_s": round(batch / floor_s, 1),
                 "dense_tok_s": round(dense["decode_tokens_per_s"], 1), "dense_prefill_s": round(dense["prefill_s"], 3)}
        for config in (c for c in runs if c != "dense"):
            row = runs[config]["rows"][i]
            entry[f"{config}_tok_s"] = round(row["decode_tokens_per_s"], 1)
            entry[f"{config}_speedup"] = round(row["decode_tokens_per_s"] / dense["decode_tokens_per_s"], 3)
            entry[f"{config}_prefill_s"] = round(row["prefill_s"], 3)
            entry[f"{config}_gsa_rows"] = row["gsa_rows"]
            entry[f"{config}_agreement"] = agreement(row["tokens"], dense["tokens"])
        rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("speed", "agree"))
    parser.add_argument("--config", choices=tuple(CONFIGS), default="dense")
    parser.add_argument("--model-dir")
    parser.add_argument("--store")
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--decode", type=int, default=64, help="decode steps timed per (context, batch)")
    parser.add_argument("--profile-steps", type=int, default=0, help="speed: also profile this many decode steps")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.80)
    parser.add_argument("--agree-configs", default="dense,gsa_all,gsa03", help="agreement: dense, then the others")
    parser.add_argument("--configs", default=",".join(SPEED_CONFIGS), help="speed: dense, then the others")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: speed, agree")
    args = parser.parse_args()
    args.max_batch = max(int(n) for n in args.batches.split(","))
    if args.role:
        {"speed": role_speed, "agree": role_agree}[args.role](args)
        return
    from bench.harness import measure_copy_ceilings, write_results

    ceilings = measure_copy_ceilings()  # before any vLLM process holds the GPU
    print(json.dumps(ceilings), flush=True)
    contexts = [int(n) for n in args.contexts.split(",")]
    extra, rows = {"layers": args.layers, "decode_steps": args.decode}, []
    common = ("--contexts", args.contexts, "--batches", args.batches, "--decode", str(args.decode),
              "--profile-steps", str(args.profile_steps),
              "--gpu-memory-utilization", str(args.gpu_memory_utilization))
    with tempfile.TemporaryDirectory(dir=os.environ.get("UCM_BENCH_TMP", "/tmp")) as tmp:
        work = Path(tmp)
        if "agree" not in args.skip:
            from bench.llama_weights import write_llama

            model = write_llama(work / "real_llama", REAL_LLAMA)
            configs = ("dense", *(c for c in args.agree_configs.split(",") if c != "dense"))
            runs = {c: run_role("--role", "agree", "--config", c, "--model-dir", str(model), "--store",
                                str(work / "store"), *common) for c in configs}
            extra["agreement"] = {c: {**agreement(runs[c]["tokens"], runs["dense"]["tokens"]),
                                      "gsa_steps": runs[c]["gsa_steps"]} for c in configs[1:]}
            extra["agreement_tokens"] = {c: runs[c]["tokens"] for c in configs}
            extra["agreement_top2"] = {c: runs[c]["top2"] for c in configs}
            print(json.dumps(extra["agreement"]), flush=True)
        if "speed" not in args.skip:
            model = write_model(work / "llama8b_shape", args.layers, max(contexts) + 4096)
            configs = ("dense", *(c for c in args.configs.split(",") if c != "dense"))
            runs = {c: run_role("--role", "speed", "--config", c, "--model-dir", str(model), "--store",
                                str(work / "store"), *common) for c in configs}
            rows = speed_rows(runs, args.layers, ceilings["hbm_read_gbps"])
            extra["speed_runs"] = {c: [{k: v for k, v in row.items() if k != "tokens"} for row in run["rows"]]
                                   for c, run in runs.items()}
            for entry in rows:
                print(json.dumps(entry), flush=True)
    import vllm
    extra["vllm"] = vllm.__version__
    print(write_results("gsa_vllm_gpu", rows, ceilings, extra))


if __name__ == "__main__":
    main()
