"""Mooncake tier against a real Mooncake master and storage node (started here on 127.0.0.1, TCP): round trip
through the factory, two processes sharing blocks, a killed or hung master turning into clean misses while the Cache
keeps serving, recovery after a restart, corrupt objects detected and removed."""
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from servers import MooncakeServers
from remote_tier_checks import (DAMAGES, SHARE_WRITER, assert_damaged_object_fails_and_is_dropped,
                                assert_outage_served_from_cache, assert_reads_shared_blocks, make)
from test_store import block_data, dump_commit, ids, load_all

from ucm_store.pipeline import block_key
from ucm_store.task import TaskStatus

pytestmark = pytest.mark.slow
RECOVERY_BOUND_S = 20.0


@pytest.fixture(scope="module")
def mooncake():
    with MooncakeServers() as servers:
        yield servers


@pytest.fixture(scope="module")
def raw_client(mooncake):
    """A plain Mooncake client, for reading and damaging objects behind the tier's back."""
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    assert client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 64 << 20, "tcp", "", mooncake.master) == 0
    yield client
    client.close()


def test_round_trip_through_the_factory_in_a_fresh_store(mooncake):
    config = mooncake.config(remote_key_prefix="rt/")
    keys, datas = ids(4, "rt"), [block_data(i) for i in range(4)]
    with make(config) as writer:
        task = writer.dump(keys, 0, torch.stack(datas))
        assert writer.wait(task) == TaskStatus.SUCCESS
        assert writer.tiers[1].contains(block_key(keys[0])) is False
        assert writer.commit(keys, [True, True, False, True]) == [True, True, False, True]
        writer.flush()
        assert writer.writeback_failures == 0
    with make(config) as reader:
        assert reader.lookup(keys) == [True, True, False, True]
        status, out, _ = load_all(reader, [keys[i] for i in (0, 1, 3)])
        assert status == TaskStatus.SUCCESS
        assert torch.equal(out, torch.stack([datas[i] for i in (0, 1, 3)]))


def test_a_node_lending_memory_serves_its_own_blocks(mooncake):
    config = mooncake.config(store_pipeline="Mooncake", remote_key_prefix="own/",
                             mooncake_global_segment_size=32 << 20)
    keys, datas = ids(3, "own"), [block_data(i, 1 << 20) for i in range(3)]
    with make(config) as store:
        assert dump_commit(store, keys, datas) == [True] * 3
        status, out, _ = load_all(store, keys, 1 << 20)
        assert status == TaskStatus.SUCCESS and torch.equal(out, torch.stack(datas))


def test_a_refused_put_is_logged_and_the_tier_keeps_serving(mooncake, caplog):
    config = mooncake.config(remote_key_prefix="refused/", mooncake_local_buffer_size=1 << 20)
    big, small = ids(1, "big"), ids(1, "small")
    with make(config) as store:
        assert dump_commit(store, big, [block_data(0, 1 << 20)]) == [True]
        store.flush()
        assert store.writeback_failures == 1
        assert dump_commit(store, small, [block_data(1)]) == [True]
        store.flush()
        assert store.writeback_failures == 1
        remote = store.tiers[1]
        assert (remote.contains(block_key(big[0])), remote.contains(block_key(small[0]))) == (False, True)
    assert f"write-down of block {big[0].hex()} failed" in caplog.text and "mooncake_local_buffer_size" in caplog.text


def test_two_processes_share_blocks(mooncake):
    config = mooncake.config(remote_key_prefix="share/")
    code = SHARE_WRITER.format(tests=os.path.dirname(__file__), config=config)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
    with make(config) as reader:
        assert_reads_shared_blocks(reader)


@pytest.mark.parametrize("outage", ["killed", "hung"])
def test_master_outage_gives_bounded_clean_misses_while_cache_serves_then_recovers(caplog, outage):
    caplog.set_level(logging.INFO)
    far, near, during = ids(4, "far"), ids(2, "near"), ids(1, "during")
    with MooncakeServers() as servers:
        config = servers.config(remote_timeout=1.0, remote_retry_interval=0.5)
        stop, restart = (servers.kill, servers.start) if outage == "killed" else (servers.pause, servers.resume)
        with make(config) as other, make(config) as store:
            dump_commit(other, far, [block_data(i) for i in range(4)])
            other.flush()
            dump_commit(store, near, [block_data(10), block_data(11)])
            store.flush()
            assert store.lookup(far) == [True] * 4
            assert_outage_served_from_cache(store, far, near, during, stop)
            restart()
            assert written_down_again(store, other, deadline=time.monotonic() + RECOVERY_BOUND_S)
        with make(config) as fresh:
            assert fresh.lookup(far) == [outage == "hung"] * 4  # a restarted master starts empty
    assert "Mooncake tier:" in caplog.text and "server reachable again" in caplog.text
    assert f"write-down of block {during[0].hex()} failed" in caplog.text


def written_down_again(store, reader, deadline: float) -> bool:
    """Dump new blocks into ``store`` until one reaches Mooncake and ``reader`` (another store) loads it."""
    attempt = 0
    while time.monotonic() < deadline:
        block = ids(1, f"after{attempt}")
        dump_commit(store, block, [block_data(100 + attempt)])
        store.flush()
        status, out, _ = load_all(reader, block)
        if status == TaskStatus.SUCCESS:
            return torch.equal(out[0], block_data(100 + attempt))
        attempt += 1
        time.sleep(0.25)
    return False


@pytest.mark.parametrize("damage", DAMAGES)
def test_corrupt_object_fails_the_load_and_is_removed(mooncake, raw_client, damage):
    prefix = f"bad-{damage}/"

    def replace(key: bytes, body: bytes) -> None:
        assert raw_client.remove(prefix + block_key(key), True) == 0
        assert raw_client.put(prefix + block_key(key), body) == 0

    keys = assert_damaged_object_fails_and_is_dropped(mooncake.config(remote_key_prefix=prefix), damage,
                                                      lambda key: raw_client.get(prefix + block_key(key)), replace)
    assert [raw_client.is_exist(prefix + block_key(k)) for k in keys] == [0, 1]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="mooncake_master"):
        make({"store_pipeline": "Cache|Mooncake"})
    with pytest.raises(ValueError, match="mooncake_master: expected host:port"):
        make({"store_pipeline": "Cache|Mooncake", "mooncake_master": "localhost"})
