"""Checks shared by the remote-tier tests (DS3FS over moto, Mooncake): two processes sharing blocks, behaviour
while the server is down, and a damaged object."""
import time

import torch
from test_store import block_data, dump_commit, ids, load_all

from ucm_store.factory import UcmConnectorFactory
from ucm_store.task import TaskStatus

OUTAGE_BOUND_S = 10.0  # the whole outage sequence below, against a dead or hung server
# A writer process (format with tests=<this folder>, config=<store config>): commits blocks "shared" 0-5.
SHARE_WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_store import block_data, dump_commit, ids
from ucm_store.factory import UcmConnectorFactory
store = UcmConnectorFactory.create_connector({config!r})
assert dump_commit(store, ids(6, "shared"), [block_data(i) for i in range(6)]) == [True] * 6
store.close()
"""


DAMAGES = ("flipped-payload", "truncated", "bad-magic", "other-block")


def assert_damaged_object_fails_and_is_dropped(config: dict, damage: str, get, replace) -> list[str]:
    """Commit two blocks, damage the first one's object as ``damage`` says (its bytes through ``get(key)``, put back
    by ``replace(key, body)``, both by block id), then: a load fails naming the check that caught it and the object
    is dropped (lookups miss it, the other block stays). Returns the two block ids."""
    keys = ids(2, damage)
    with make(config) as writer:
        dump_commit(writer, keys, [block_data(0), block_data(1)])
    body = bytearray(get(keys[0]))
    if damage == "flipped-payload":
        body[5000] ^= 0xFF
    elif damage == "truncated":
        body = body[:1000]
    elif damage == "bad-magic":
        body[0] ^= 0x01
    else:
        body = bytearray(get(keys[1]))
    replace(keys[0], bytes(body))
    with make(config) as reader:
        assert reader.lookup(keys) == [True, True]
        status, _, task = load_all(reader, keys[:1])
        assert status == TaskStatus.FAILURE
        assert any(word in task.describe_failures() for word in ("CRC32", "truncated", "bad header", "expected"))
        assert reader.lookup(keys) == [False, True]
    return keys


def make(config: dict):
    """A store from ``config`` (rank 0), as the remote-tier tests open them."""
    return UcmConnectorFactory.create_connector(config, local_rank=0)


def assert_outage_served_from_cache(store, far: list[bytes], near: list[bytes], during: list[bytes], stop) -> None:
    """Call ``stop()`` (the server dies or hangs), then: the 4 ``far`` blocks (remote only) miss at lookup and
    fail to load; the 2 ``near`` blocks (``block_data(10)``, ``(11)``, in the Cache) load; a new ``during`` block
    (``block_data(20)``) commits to the Cache, its write-down fails once and it stays visible; all within
    OUTAGE_BOUND_S."""
    stop()
    start = time.monotonic()
    assert store.lookup(far) == [False] * 4
    status, _, task = load_all(store, far)
    assert status == TaskStatus.FAILURE and len(task.failures) == 4
    status, out, _ = load_all(store, near)
    assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(10), block_data(11)]))
    assert dump_commit(store, during, [block_data(20)]) == [True]
    store.flush()
    assert time.monotonic() - start < OUTAGE_BOUND_S
    assert store.writeback_failures == 1 and store.lookup(during) == [True]


def assert_reads_shared_blocks(reader) -> None:
    """``reader`` (another process's store) sees exactly the blocks SHARE_WRITER committed, bit for bit."""
    assert reader.lookup(ids(7, "shared")) == [True] * 6 + [False]
    assert reader.lookup_on_prefix(ids(7, "shared")) == 5
    status, out, _ = load_all(reader, ids(6, "shared"))
    assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack([block_data(i) for i in range(6)]))
