"""DS3FS tier against a real S3 server (moto, started here on 127.0.0.1): round trip through the factory, multipart
uploads, two processes sharing blocks, a killed server turning into clean misses while the Cache keeps serving,
recovery after a restart, corrupt objects detected and removed, credentials never logged."""
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from servers import S3_BUCKET, S3_KEYS, MotoS3Server
from remote_tier_checks import (DAMAGES, SHARE_WRITER, assert_damaged_object_fails_and_is_dropped,
                                assert_outage_served_from_cache, assert_reads_shared_blocks, make)
from test_store import block_data, dump_commit, ids, load_all

from ucm_store.backends import s3 as s3_backend
from ucm_store.config import load_store_config
from ucm_store.pipeline import block_key
from ucm_store.task import TaskStatus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with MotoS3Server() as server:
        yield server


def object_names(server: MotoS3Server, prefix: str) -> list[str]:
    listing = server.client().list_objects_v2(Bucket=S3_BUCKET, Prefix=prefix)
    return sorted(entry["Key"] for entry in listing.get("Contents", []))


def object_name(prefix: str, block_id: bytes) -> str:
    key = block_key(block_id)
    return f"{prefix}{key[:2]}/{key}"


def test_round_trip_through_the_factory_and_nothing_uploaded_before_commit(s3):
    config = s3.config(remote_key_prefix="rt/")
    keys, datas = ids(4, "rt"), [block_data(i) for i in range(4)]
    with make(config) as writer:
        task = writer.dump(keys, 0, torch.stack(datas))
        assert writer.wait(task) == TaskStatus.SUCCESS
        assert object_names(s3, "rt/") == []
        assert writer.commit(keys, [True, True, False, True]) == [True, True, False, True]
        writer.flush()
        assert writer.writeback_failures == 0
    kept = [keys[i] for i in (0, 1, 3)]
    assert object_names(s3, "rt/") == sorted(object_name("rt/", k) for k in kept)
    with make(config) as reader:
        assert reader.lookup(keys) == [True, True, False, True]
        status, out, _ = load_all(reader, kept)
        assert status == TaskStatus.SUCCESS
        assert torch.equal(out, torch.stack([datas[i] for i in (0, 1, 3)]))


def test_large_blocks_upload_in_parts_and_load_whole(s3):
    config = s3.config(remote_key_prefix="mp/", multipart_threshold=5 << 20, multipart_chunk_size=5 << 20)
    keys, datas = ids(1, "mp"), [block_data(7, 11 << 20)]
    with make(config) as writer:
        assert dump_commit(writer, keys, datas) == [True]
    head = s3.client().head_object(Bucket=S3_BUCKET, Key=object_name("mp/", keys[0]))
    assert head["ETag"].strip('"').endswith("-3")  # a completed 3-part multipart upload
    assert head["ContentLength"] == (11 << 20) + 64
    with make(config) as reader:
        status, out, _ = load_all(reader, keys, 11 << 20)
        assert status == TaskStatus.SUCCESS and torch.equal(out[0], datas[0])


def test_two_processes_share_blocks_writer_configured_by_environment(s3):
    config = {"store_pipeline": "Cache|DS3FS", "remote_key_prefix": "share/"}
    code = SHARE_WRITER.format(tests=os.path.dirname(__file__), config=config)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ, **s3.environment()})
    with make(s3.config(remote_key_prefix="share/")) as reader:
        assert_reads_shared_blocks(reader)


@pytest.mark.parametrize("outage", ["killed", "hung"])
def test_server_outage_gives_bounded_clean_misses_while_cache_serves_then_recovers(caplog, outage):
    caplog.set_level(logging.INFO)
    far, near, during, after = ids(4, "far"), ids(2, "near"), ids(1, "during"), ids(1, "after")
    with MotoS3Server() as server:
        config = server.config(remote_timeout=1.0, remote_retry_interval=0.5)
        with make(config) as other:
            dump_commit(other, far, [block_data(i) for i in range(4)])
        stop, restart = (server.kill, server.start) if outage == "killed" else (server.pause, server.resume)
        with make(config) as store:
            dump_commit(store, near, [block_data(10), block_data(11)])
            store.flush()
            assert store.lookup(far) == [True] * 4
            assert_outage_served_from_cache(store, far, near, during, stop)
            restart()
            time.sleep(config["remote_retry_interval"])
            dump_commit(store, after, [block_data(30)])
            store.flush()
            assert store.writeback_failures == 1
        with make(config) as fresh:
            kept = outage == "hung"  # a killed moto restarts empty
            assert fresh.lookup(after + far) == [True] + [kept] * 4
            status, out, _ = load_all(fresh, after)
            assert status == TaskStatus.SUCCESS and torch.equal(out[0], block_data(30))
    assert "DS3FS tier: head of block" in caplog.text and "server reachable again" in caplog.text
    assert f"write-down of block {during[0].hex()} failed" in caplog.text
    assert S3_KEYS["s3_secret_access_key"] not in caplog.text


@pytest.mark.parametrize("damage", DAMAGES)
def test_corrupt_object_fails_the_load_and_is_removed(s3, damage):
    prefix = f"bad-{damage}/"
    client = s3.client()

    def get(key: bytes) -> bytes:
        return client.get_object(Bucket=S3_BUCKET, Key=object_name(prefix, key))["Body"].read()

    def replace(key: bytes, body: bytes) -> None:
        client.put_object(Bucket=S3_BUCKET, Key=object_name(prefix, key), Body=body)

    keys = assert_damaged_object_fails_and_is_dropped(s3.config(remote_key_prefix=prefix), damage, get, replace)
    assert object_names(s3, prefix) == [object_name(prefix, keys[1])]


def test_config_errors_name_the_key_and_secrets_are_masked(monkeypatch, caplog):
    for variable in ("AWS_BUCKET_NAME", "AWS_BUCKET"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match="s3_bucket"):
        make({"store_pipeline": "Cache|DS3FS"})
    config = load_store_config({"store_pipeline": "Cache|DS3FS", **S3_KEYS, "s3_session_token": "token-xyz"})
    assert S3_KEYS["s3_secret_access_key"] not in repr(config) and "token-xyz" not in repr(config)
    assert "s3_secret_access_key='***'" in repr(config) and "s3_access_key_id='AKIAUCMTEST'" in repr(config)
    caplog.set_level(logging.INFO)
    s3_backend._note_io_uring_ignored.cache_clear()
    for _ in range(2):
        make({"store_pipeline": "Cache|DS3FS", "s3_bucket": S3_BUCKET, "use_io_uring": True}).close()
    assert caplog.text.count("use_io_uring is accepted and ignored") == 1
