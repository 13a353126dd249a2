"""Bad input, generated (hypothesis): config dicts and YAML text, block ids ("../", NUL bytes, 4 KiB), tensors and
offsets that do not fit. Each is either accepted and works, or refused with a ValueError naming what is wrong; no
block id places a file outside the storage root; secrets never reach an error or a log line. Also: everything the
Posix tier creates is owner-only, whatever the umask."""
import dataclasses
import hashlib
import itertools
import logging
import os
import re
import string
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ucm_store.config import (DOCUMENT_KEYS, SECRET_KEYS, StoreConfig, default_io_workers, load_store_config,
                              parse_connectors)
from ucm_config import ConfigError
from ucm_store.factory import UcmConnectorFactory
from ucm_store.pipeline import MAX_BLOCK_ID_BYTES, block_key
from ucm_store.task import TaskStatus

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STORE_KEYS = [f.name for f in dataclasses.fields(StoreConfig)]
BLOCK = 4096

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
           | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                            inner, max_size=3),
                      max_leaves=6)
secrets = (st.text(string.ascii_letters + string.digits, min_size=8, max_size=16).map(lambda s: "S3CR3T" + s)
           | st.integers(10**12, 10**15))
config_dicts = st.dictionaries(st.sampled_from(STORE_KEYS) | st.text(max_size=12).filter(
    lambda k: k not in DOCUMENT_KEYS), values, max_size=4)


class Captured(logging.Handler):
    """Every log line of the ``ucm_store`` loggers while installed."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))

    def __enter__(self):
        logging.getLogger("ucm_store").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("ucm_store").removeHandler(self)


def outcome(source) -> StoreConfig | ConfigError:
    """The config ``source`` gives, or the ConfigError it raises (anything else fails the test)."""
    try:
        return load_store_config(source)
    except ConfigError as exc:
        return exc


# ---- configs ---------------------------------------------------------------------------------------------------
@SETTINGS
@given(raw=config_dicts, secret_key=st.sampled_from(SECRET_KEYS), secret=secrets)
@example(raw={"remote_timeout": float("nan")}, secret_key=SECRET_KEYS[0], secret="S3CR3Tnan-check")
@example(raw={}, secret_key=SECRET_KEYS[1], secret=10**12)
def test_config_dict_is_accepted_or_refused_naming_a_key_and_never_shows_a_secret(raw, secret_key, secret):
    raw = {**raw, secret_key: secret}
    with Captured() as log:
        result = outcome(raw)
    shown = str(result) + repr(result) + "".join(log.lines)
    assert str(secret) not in shown
    if isinstance(result, ConfigError):
        assert any(str(key) in str(result) for key in raw), result
    else:
        for key, value in raw.items():
            assert getattr(result, key) == as_stored(key, value)


def as_stored(key: str, value):
    """A valid value as the StoreConfig holds it (lists as tuples, one storage directory as a 1-tuple, io_workers
    unset as this machine's default)."""
    if key == "storage_backends" and isinstance(value, str):
        return (value,)
    if key == "io_workers" and value is None:
        return default_io_workers()
    return tuple(value) if isinstance(value, list) else value


@SETTINGS
@given(raw=config_dicts)
def test_config_from_yaml_equals_config_from_the_same_dict(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ucm.yaml"
        path.write_text(yaml.safe_dump({"ucm_connector_config": raw}, sort_keys=False))
        from_yaml, from_dict = outcome(str(path)), outcome({"ucm_connector_config": raw})
    assert type(from_yaml) is type(from_dict)
    if isinstance(from_dict, StoreConfig):
        assert repr(from_yaml) == repr(from_dict)
    else:
        assert str(from_yaml) == str(from_dict)


yaml_lines = st.lists(st.sampled_from(STORE_KEYS + ["ucm_connectors", "ucm_connector_config", "- "]).map(
    lambda k: f"{k}: ") | st.text(max_size=15), min_size=1, max_size=6)


@SETTINGS
@given(lines=yaml_lines, secret=secrets, where=st.integers(0, 6))
@example(lines=["? [a, b]", ": 1"], secret="S3CR3Tunhashable", where=0)
def test_any_yaml_text_is_accepted_or_refused_and_never_shows_a_secret(lines, secret, where):
    lines.insert(where % (len(lines) + 1), f"s3_secret_access_key: {secret}" + ("" if where % 2 else " : x"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ucm.yaml"
        path.write_text("\n".join(lines))
        with Captured() as log:
            result = outcome(str(path))
    assert str(secret) not in str(result) + repr(result) + "".join(log.lines)


@pytest.mark.parametrize("source, message", [
    ({"ucm_config_file": 5}, "ucm_config_file: expected the path of a YAML file, got int 5"),
    ({"ucm_connectors": {"ucm_connector_config": {"s3_secret_access_key": "S3CR3Tx"}}},
     "ucm_connectors: expected a non-empty list of connectors, got a mapping with keys 'ucm_connector_config'"),
    ({"ucm_connectors": [["s3_secret_access_key", "S3CR3Tx"]]},
     "ucm_connectors[0]: expected a mapping with ucm_connector_name and ucm_connector_config, got a list of 2 items"),
    ({"ucm_connector_config": [{"s3_secret_access_key": "S3CR3Tx"}]},
     "ucm_connector_config must be a mapping of keys to values, got a list of 1 items"),
])
def test_document_level_mistakes_are_refused_naming_the_key_and_no_value(source, message):
    with pytest.raises(ConfigError) as err:
        parse_connectors(source)
    assert message in str(err.value) and "S3CR3T" not in str(err.value)


def test_config_file_overrides_need_a_mapping_in_the_file(tmp_path):
    path = tmp_path / "ucm.yaml"
    path.write_text("ucm_connector_config: [s3_secret_access_key: S3CR3Tx]\n")
    with pytest.raises(ConfigError, match="ucm_connector_config in the ucm_config_file must be a mapping") as err:
        load_store_config({"ucm_config_file": str(path), "cache_capacity": 7})
    assert "S3CR3T" not in str(err.value)


# ---- block ids -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """(base directory, storage root inside it): nothing may appear in base outside the root."""
    base = tmp_path_factory.mktemp("ids")
    return base, base / "store"


@pytest.fixture(scope="module")
def posix_store(store_dir):
    with UcmConnectorFactory.create_connector({"store_pipeline": "Posix", "storage_backends": str(store_dir[1])},
                                              0) as store:
        yield store


hostile_ids = (st.binary(min_size=1, max_size=64)
               | st.integers(1, 40).map(lambda n: b"../" * n + b"etc/passwd")
               | st.binary(min_size=1, max_size=8).map(lambda b: b"\0" + b + b"\0/..")
               | st.binary(min_size=1, max_size=8).map(lambda b: (b * MAX_BLOCK_ID_BYTES)[:MAX_BLOCK_ID_BYTES])
               | st.just(b"/" * MAX_BLOCK_ID_BYTES))


def content(block_id: bytes) -> torch.Tensor:
    """BLOCK bytes that depend on the id (a repeated id must load what it first stored: blocks are immutable)."""
    return torch.frombuffer(bytearray(hashlib.blake2b(block_id).digest() * (BLOCK // 64)), dtype=torch.uint8)


@SETTINGS
@given(block_id=hostile_ids)
def test_any_block_id_round_trips_with_its_file_inside_the_root(posix_store, store_dir, block_id):
    base, root = store_dir
    data = content(block_id)
    assert posix_store.wait(posix_store.dump([block_id], 0, data)) == TaskStatus.SUCCESS
    posix_store.commit([block_id], [True])
    out = torch.empty(BLOCK, dtype=torch.uint8)
    assert posix_store.wait(posix_store.load([block_id], 0, out)) == TaskStatus.SUCCESS and torch.equal(out, data)
    key = block_key(block_id)
    assert re.fullmatch("[0-9a-f]{32}", key) and (root / "blocks" / key[:2] / f"{key}.blk").is_file()
    assert os.listdir(base) == ["store"] and sorted(os.listdir(root)) == ["blocks", "tmp"]


bad_ids = (st.just(b"") | st.binary(min_size=MAX_BLOCK_ID_BYTES + 1, max_size=MAX_BLOCK_ID_BYTES + 8)
           | st.text(min_size=1, max_size=8) | st.integers() | st.none() | st.binary(min_size=1).map(memoryview))


@SETTINGS
@given(good=st.lists(st.binary(min_size=1, max_size=8), max_size=3), bad=bad_ids)
def test_a_bad_block_id_is_refused_naming_its_index(posix_store, good, bad):
    block_ids = good + [bad]
    for call in (lambda: posix_store.lookup(block_ids), lambda: posix_store.lookup_on_prefix(block_ids),
                 lambda: posix_store.commit(block_ids, [True] * len(block_ids)),
                 lambda: posix_store.dump(block_ids, 0, torch.zeros(len(block_ids), 8, dtype=torch.uint8))):
        with pytest.raises(ValueError, match=rf"block_ids\[{len(good)}\]: expected non-empty bytes of at most "
                                             f"{MAX_BLOCK_ID_BYTES} bytes"):
            call()
    with pytest.raises(ValueError, match="block_ids: expected a list of bytes"):
        posix_store.lookup(b"".join(good) or b"x")


# ---- tensors and offsets ---------------------------------------------------------------------------------------
DTYPES = [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.bool,
          torch.complex64]


@st.composite
def tensors(draw):
    """(tensor, the ValueError message expected or None): random shapes and dtypes, some transposed, empty, sparse
    or on the meta device."""
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(["dense", "dense", "transposed", "sparse", "meta"]))
    if kind == "meta":
        return torch.empty(shape, dtype=dtype, device="meta"), "tensor: on device meta; allowed: cpu or cuda"
    count = 1 if not shape else int(torch.tensor(shape).prod())
    tensor = (torch.arange(count) % 7 + 1).to(dtype).reshape(shape)
    if kind == "transposed" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, -1)
    if kind == "sparse" and tensor.dim() >= 1 and dtype not in (torch.bool, torch.bfloat16, torch.float16):
        return tensor.to_sparse(), "tensor: expected a dense \\(strided\\) tensor"
    if not tensor.is_contiguous():
        return tensor, "tensor: must be contiguous"
    return tensor, None


TENSOR_NAMES = itertools.count()


@SETTINGS
@given(case=tensors(), parts=st.integers(1, 4))
def test_a_tensor_is_refused_naming_what_does_not_fit_or_round_trips(posix_store, case, parts):
    tensor, refused = case
    names = [f"t{next(TENSOR_NAMES)}".encode() for _ in range(parts)]
    nbytes = tensor.numel() * tensor.element_size()
    if refused is None and (nbytes == 0 or nbytes % parts):
        refused = f"tensor: {nbytes} bytes do not split into {parts} equal non-empty block parts"
    if refused:
        for call in (posix_store.dump, posix_store.load):
            with pytest.raises(ValueError, match=refused):
                call(names, 0, tensor)
        return
    assert posix_store.wait(posix_store.dump(names, 0, tensor)) == TaskStatus.SUCCESS
    assert posix_store.commit(names, [True] * parts) == [True] * parts
    out = torch.zeros_like(tensor)
    assert posix_store.wait(posix_store.load(names, 0, out)) == TaskStatus.SUCCESS and torch.equal(out, tensor)


@SETTINGS
@given(offset=st.integers(max_value=-1) | st.booleans() | st.floats() | st.text(max_size=3) | st.none())
def test_a_bad_offset_is_refused_naming_it(posix_store, offset):
    with pytest.raises(ValueError, match="offset: expected a byte offset >= 0"):
        posix_store.dump([b"x"], offset, torch.ones(8, dtype=torch.uint8))


@SETTINGS
@given(extra=st.integers(1, 3 * BLOCK), offset=st.integers(0, BLOCK))
def test_a_load_past_the_stored_block_fails_naming_the_range_and_leaves_the_tensor(posix_store, extra, offset):
    data = torch.randint(0, 256, (BLOCK,), dtype=torch.uint8)
    posix_store.wait(posix_store.dump([b"fixed"], 0, data))
    posix_store.commit([b"fixed"], [True])
    size = BLOCK - offset + extra
    out = torch.full((size,), 7, dtype=torch.uint8)
    task = posix_store.load([b"fixed"], offset, out)
    assert posix_store.wait(task) == TaskStatus.FAILURE and bool((out == 7).all())
    assert (f"ValueError: block {block_key(b'fixed')} holds {BLOCK} bytes; bytes [{offset}, {offset + size}) were "
            "asked for") in task.failures[b"fixed"]


# ---- owner-only files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [{"store_pipeline": "Posix"}, {"store_pipeline": "Cache|Posix",
                                                                  "use_direct_io": True},
                                    {"store_pipeline": "NFS", "path_strategy": "hash"}])
def test_everything_the_store_creates_is_owner_only_whatever_the_umask(tmp_path, config):
    roots = [str(tmp_path / "missing" / "parents" / f"root{i}") for i in range(2)]
    old = os.umask(0)
    try:
        with UcmConnectorFactory.create_connector({**config, "storage_backends": roots}, 0) as store:
            names = [f"perm{i}".encode() for i in range(8)]
            store.wait(store.dump(names, 0, torch.ones(8, BLOCK, dtype=torch.uint8)))
            assert store.commit(names, [True] * 8) == [True] * 8
    finally:
        os.umask(old)
    created = [p for p in (tmp_path / "missing").rglob("*")] + [tmp_path / "missing"]
    assert len([p for p in created if p.suffix == ".blk"]) == 8
    assert {oct(p.stat().st_mode & 0o777) for p in created} <= {"0o700", "0o600"}
