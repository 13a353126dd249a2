"""A Llama checkpoint of seeded random weights at real scale, written as a Hugging Face folder vLLM loads.

vLLM's ``load_format="dummy"`` fills every weight with U(-1e-3, 1e-3): attention is then uniform and an answer
depends on the last prompt token only, so "same tokens cold and warm" cannot catch a wrong KV block. Here every
projection is N(0, 1/fan_in) and embeddings N(0, 1): attention is peaked and the next token depends on the
whole prefix (the e2e tests prove it with a control prompt that differs only in its first block).
"""
import json
from pathlib import Path

import torch

LLAMA_DEFAULTS = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def llama_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded real-scale weights for a Llama ``config`` (hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads, num_hidden_layers, vocab_size): name -> bf16 tensor, Hugging Face naming."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": linear(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        tensors |= {f"{layer}.self_attn.q_proj.weight": linear(hidden, hidden),
                    f"{layer}.self_attn.k_proj.weight": linear(kv, hidden),
                    f"{layer}.self_attn.v_proj.weight": linear(kv, hidden),
                    f"{layer}.self_attn.o_proj.weight": linear(hidden, hidden),
                    f"{layer}.mlp.gate_proj.weight": linear(inter, hidden),
                    f"{layer}.mlp.up_proj.weight": linear(inter, hidden),
                    f"{layer}.mlp.down_proj.weight": linear(hidden, inter),
                    f"{layer}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                    f"{layer}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    return tensors


def write_llama(directory: Path, config: dict, seed: int = 0) -> Path:
    """Write ``config.json`` (``config`` over :data:`LLAMA_DEFAULTS`) and ``model.safetensors`` of
    :func:`llama_tensors` into ``directory``; return it. Rewrites nothing already written for the same config and
    seed."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    full = {**LLAMA_DEFAULTS, **config, "ucm_weights_seed": seed}
    marker = directory / "config.json"
    if marker.exists() and json.loads(marker.read_text()) == full and (directory / "model.safetensors").exists():
        return directory
    save_file(llama_tensors(full, seed), str(directory / "model.safetensors"))
    marker.write_text(json.dumps(full))
    return directory
