"""The connector's scheduler-side bookkeeping on duck-typed requests: which blocks load and which save, per kv_role."""
from types import SimpleNamespace

import pytest

from ucm_store.hashing import BlockHasher, HashNamespace
from ucm_store.vllm.scheduler import SchedulerBookkeeping

BLOCK = 4


def request(req_id: str, tokens: int):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(range(tokens)), lora_request=None,
                           cache_salt=None, mm_features=None)


def books(hits: int, **role) -> SchedulerBookkeeping:
    """Bookkeeping over a store whose lookups find the first ``hits`` blocks in the Cache tier."""
    hasher = BlockHasher(HashNamespace("m", "bf16", "nhd", BLOCK), jit=False)
    return SchedulerBookkeeping(hasher, lambda ids: ["Cache"] * min(hits, len(ids)), **role)


def prefill(book: SchedulerBookkeeping, req, block_ids: list[int]):
    """One request through lookup, allocation and the step that computes its whole prompt: (matched, metadata)."""
    matched, _ = book.num_new_matched_tokens(req, 0)
    book.after_alloc(req, block_ids, matched)
    new = SimpleNamespace(req_id=req.request_id, block_ids=(block_ids,), num_computed_tokens=matched)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[])
    return matched, book.step([new], cached, {req.request_id: len(req.prompt_token_ids) - matched})


@pytest.mark.parametrize("loads,saves", [(True, True), (True, False), (False, True)])
def test_kv_role_decides_whether_hits_load_and_prompt_blocks_save(loads, saves):
    req = request("r", 5 * BLOCK + 1)  # 5 full blocks; the store holds the first 2
    matched, (sync_loads, async_loads, saved) = prefill(books(2, loads=loads, saves=saves), req, list(range(10, 16)))
    assert matched == (2 * BLOCK if loads else 0)
    assert [t.vllm_block_ids for t in sync_loads] == ([[10, 11]] if loads else [])
    assert async_loads == []
    first_unsaved = 2 if loads else 0  # a loaded block is in the store already
    assert [t.vllm_block_ids for t in saved] == ([list(range(10 + first_unsaved, 15))] if saves else [])


def test_a_consumer_never_holds_a_finished_request_for_saves():
    book = books(0, loads=True, saves=False)
    prefill(book, request("r", 3 * BLOCK), [1, 2, 3])
    assert book.finished("r") is False
