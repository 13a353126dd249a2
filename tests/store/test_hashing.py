"""Block hashing: Numba kernel equals its Python twin, chaining, namespaces, determinism across processes."""
import subprocess
import sys

import numpy as np
import pytest

from ucm_store.hashing import BlockHasher, HashNamespace, chain_hash_reference, ids_to_bytes

NS = HashNamespace(model="llama-3.1-8b", dtype="bfloat16", kv_layout="flash", block_size=16, tp_size=2, rank=1)


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 200_000, n)


@pytest.mark.parametrize("block_size, n_tokens", [(16, 16 * 37 + 5), (1, 9), (64, 63), (8, 8 * 200)])
def test_numba_equals_python_twin(block_size, n_tokens):
    hasher = BlockHasher(HashNamespace("m", "float16", "flashinfer", block_size))
    tokens = _tokens(n_tokens, seed=block_size)
    hi, lo = np.frombuffer(hasher.namespace.root(), dtype="<u8")
    expected = chain_hash_reference(tokens.tolist(), block_size, int(hi), int(lo))
    got = hasher.hash_array(tokens)
    assert [(int(a), int(b)) for a, b in got] == expected
    assert len(expected) == n_tokens // block_size


def test_only_full_blocks_and_prefix_property():
    hasher = BlockHasher(NS)
    tokens = _tokens(16 * 10 + 7)
    ids = hasher.block_ids(tokens)
    assert len(ids) == 10 and all(len(i) == 16 for i in ids)
    assert hasher.block_ids(tokens[:16 * 4]) == ids[:4]
    changed = tokens.copy()
    changed[16 * 4 + 3] += 1
    other = hasher.block_ids(changed)
    assert other[:4] == ids[:4] and all(a != b for a, b in zip(other[4:], ids[4:]))


def test_parent_continues_the_chain():
    hasher = BlockHasher(NS)
    tokens = _tokens(16 * 8)
    ids = hasher.block_ids(tokens)
    assert hasher.block_ids(tokens[16 * 3:], parent=ids[2]) == ids[3:]


@pytest.mark.parametrize("field, value", [("model", "other"), ("dtype", "float16"), ("kv_layout", "cpu"),
                                          ("block_size", 16), ("tp_size", 4), ("rank", 0)])
def test_namespace_fields_and_extra_keys_separate_caches(field, value):
    tokens = _tokens(64)
    base = BlockHasher(NS).block_ids(tokens)
    fields = {"model": NS.model, "dtype": NS.dtype, "kv_layout": NS.kv_layout, "block_size": NS.block_size,
              "tp_size": NS.tp_size, "rank": NS.rank, field: value}
    if fields == vars(NS):
        fields["block_size"] = 8
    assert set(BlockHasher(HashNamespace(**fields)).block_ids(tokens)).isdisjoint(base)
    assert set(BlockHasher(NS).block_ids(tokens, extra_keys=("lora:a",))).isdisjoint(base)
    salted = BlockHasher(NS).block_ids(tokens, extra_keys=("lora:a", b"salt"))
    assert BlockHasher(NS).block_ids(tokens, extra_keys=("lora:a", b"salt")) == salted


def test_deterministic_across_processes():
    code = ("import numpy as np; from ucm_store.hashing import BlockHasher, HashNamespace;"
            "ns = HashNamespace('llama-3.1-8b', 'bfloat16', 'flash', 16, 2, 1);"
            "t = np.random.default_rng(0).integers(0, 200000, 16 * 50 + 3);"
            "print(b''.join(BlockHasher(ns).block_ids(t, extra_keys=('salt',))).hex())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip() for seed in ("1", "2")]
    here = b"".join(BlockHasher(NS).block_ids(_tokens(16 * 50 + 3), extra_keys=("salt",))).hex()
    assert runs[0] == runs[1] == here


def test_ids_to_bytes_keeps_trailing_zero_bytes():
    ids = np.array([[1, 0], [0, 0]], dtype=np.uint64)
    assert ids_to_bytes(ids) == [b"\x01" + b"\x00" * 15, b"\x00" * 16]


@pytest.mark.parametrize("tokens, message", [
    (np.zeros((2, 16), dtype=np.int64), "expected a 1-D sequence"),
    (np.array([1.5] * 16), "expected integers"),
    (np.array([-1] + [0] * 15), "negative token id -1"),
])
def test_bad_tokens(tokens, message):
    with pytest.raises(ValueError, match=message):
        BlockHasher(NS).block_ids(tokens)


def test_bad_namespace_and_parent():
    with pytest.raises(ValueError, match="rank=2, tp_size=2"):
        HashNamespace("m", "bf16", "flash", 16, tp_size=2, rank=2)
    with pytest.raises(ValueError, match="parent: expected a 16-byte block id, got 3 bytes"):
        BlockHasher(NS).block_ids(_tokens(32), parent=b"abc")


def test_plain_python_hashing_gives_the_numba_ids_without_loading_numba():
    """vLLM's scheduler process hashes with jit=False (Numba and LLVM would add ~117 MiB to it): same ids."""
    tokens = _tokens(16 * 40 + 3, seed=7)
    fast, plain = BlockHasher(NS), BlockHasher(NS, jit=False)
    assert plain.block_ids(tokens, extra_keys=("salt:x",)) == fast.block_ids(tokens, extra_keys=("salt:x",))
    parent = fast.block_ids(tokens)[4]
    assert plain.block_ids(tokens[80:], parent=parent) == fast.block_ids(tokens[80:], parent=parent)
    assert plain.block_ids(tokens[:15]) == fast.block_ids(tokens[:15]) == []
    code = ("import sys, numpy as np; from ucm_store.hashing import BlockHasher, HashNamespace;"
            "ns = HashNamespace('m', 'bf16', 'x', 16); BlockHasher(ns, jit=False).block_ids(np.arange(100));"
            "print('numba' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
