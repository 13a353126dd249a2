"""Config: every seed key from both formats, and each error case with its message."""
import dataclasses

import pytest
import yaml

from ucm.config import load_ucm_config
from ucm_sparse.config import GSAConfig, load_gsa_fragment, parse_sparse
from ucm_store.config import (TIER_NAMES, ConfigError, StoreConfig, load_store_config, parse_connectors,
                              recommended_buffer_number)

STORE_VALUES = {  # a valid, non-default value for every store key
    "store_pipeline": "Cache|NFS", "storage_backends": ["/mnt/nfs1/ucm_cache", "/mnt/nfs2/ucm_cache"],
    "buffer_number": 4096, "pinned_pool_size": 1 << 29, "max_pinned_size": 1 << 31, "block_size": 32,
    "load_async": "never", "metrics_port": 9478, "metrics_addr": "0.0.0.0",
    "cache_capacity": 50000, "prefetch_enabled": True, "prefetch_depth": 8, "use_direct_io": True,
    "path_strategy": "hash", "connection_pool_size": 64, "max_concurrent_requests": 128, "use_io_uring": True,
    "multipart_threshold": 16 << 20, "multipart_chunk_size": 6 << 20, "io_workers": 3, "storage_capacity": 1 << 30,
    "remote_timeout": 2.5, "remote_retry_interval": 0.5, "remote_key_prefix": "llama/", "s3_bucket": "kv-cache",
    "s3_endpoint": "http://10.0.0.5:9000", "s3_region": "eu-west-1", "s3_access_key_id": "AKIAEXAMPLE",
    "s3_secret_access_key": "secret", "s3_session_token": "token", "mooncake_master": "10.0.0.7:50051",
    "mooncake_metadata_server": "http://10.0.0.7:8080/metadata", "mooncake_local_hostname": "10.0.0.8",
    "mooncake_protocol": "rdma", "mooncake_rdma_devices": "mlx5_0", "mooncake_global_segment_size": 1 << 30,
    "mooncake_local_buffer_size": 256 << 20,
}
GSA_VALUES = {"sparse_ratio": 0.2, "local_window_sz": 2, "init_window_sz": 3, "min_blocks": 5,
              "prefetch_workers": 8, "prefetch_ahead": 2, "max_pending_prefetch": 256, "score": "mean",
              "token_budget": 2048, "offload": True, "gpu_budget_blocks": 100, "gpu_budget_bytes": 1 << 30,
              "repr_dtype": "fp8", "dense_first_layers": 3, "select_every": 4, "rerank_candidates": 2.5,
              "select_drift": 0.05}


def _expected(key, value):
    return tuple(value) if isinstance(value, list) else value


def test_value_table_covers_every_key():
    assert set(STORE_VALUES) == {f.name for f in dataclasses.fields(StoreConfig)}
    assert set(GSA_VALUES) == {f.name for f in dataclasses.fields(GSAConfig)}
    for key, value in STORE_VALUES.items():
        assert _expected(key, value) != getattr(StoreConfig(), key), key


@pytest.mark.parametrize("key", sorted(STORE_VALUES))
def test_store_key_from_bare_dict(key):
    config = load_store_config({key: STORE_VALUES[key]})
    assert getattr(config, key) == _expected(key, STORE_VALUES[key])


@pytest.mark.parametrize("key", sorted(STORE_VALUES))
def test_store_key_from_yaml_document(tmp_path, key):
    doc = {"ucm_connectors": [{"ucm_connector_name": "UcmPipelineStore",
                               "ucm_connector_config": {key: STORE_VALUES[key]}}]}
    path = tmp_path / "ucm.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert getattr(load_store_config(str(path)), key) == _expected(key, STORE_VALUES[key])


@pytest.mark.parametrize("key", sorted(GSA_VALUES))
def test_gsa_key_from_document_and_flat_extra_config(tmp_path, key):
    companions = {"select_every": GSA_VALUES["select_every"]} if key == "select_drift" else {}
    sparse = {"ucm_sparse_method": "GSA", "ucm_sparse_config": {"GSA": {key: GSA_VALUES[key], **companions}}}
    path = tmp_path / "ucm.yaml"
    path.write_text(yaml.safe_dump({"ucm_connectors": [{"ucm_connector_config": {}}], **sparse}))
    for source in (str(path), {"store_pipeline": "Cache|Posix", **sparse}):
        config = load_ucm_config(source)
        assert config.sparse.method == "GSA"
        assert getattr(config.sparse.gsa, key) == GSA_VALUES[key]


def test_all_keys_at_once_equal_key_by_key():
    config = load_store_config(STORE_VALUES)
    assert all(getattr(config, k) == _expected(k, v) for k, v in STORE_VALUES.items())
    assert dataclasses.asdict(parse_sparse({"ucm_sparse_config": {"GSA": GSA_VALUES}}).gsa) == GSA_VALUES


def test_storage_backends_string_or_list():
    assert load_store_config({"storage_backends": "/data/ucm_cache"}).storage_backends == ("/data/ucm_cache",)
    assert load_store_config({"storage_backends": ["/a", "/b"]}).storage_backends == ("/a", "/b")


def test_seed_section_8_documents(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("""
ucm_connectors:
  - ucm_connector_name: "UcmPipelineStore"
    ucm_connector_config:
      store_pipeline: "Cache|NFS"
      storage_backends:
        - "/mnt/nfs1/ucm_cache"
        - "/mnt/nfs2/ucm_cache"
      buffer_number: 4096
      cache_capacity: 100000
      block_size: 16
      path_strategy: "round_robin"

ucm_sparse_method: "GSA"
ucm_sparse_config:
  GSA:
    sparse_ratio: 0.3
    prefetch_workers: 8
    max_pending_prefetch: 256
""")
    config = load_ucm_config(str(path))
    store = config.connectors[0].config
    assert (store.tiers, store.buffer_number, store.cache_capacity) == (("Cache", "NFS"), 4096, 100000)
    assert (config.sparse.gsa.prefetch_workers, config.sparse.gsa.max_pending_prefetch) == (8, 256)


def test_ucm_connector_config_wrapper_and_config_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ucm_connector_config:\n  store_pipeline: 'Cache|Posix'\n  cache_capacity: 50000\n"
                    "  prefetch_enabled: true\n  prefetch_depth: 4\n")
    config = load_store_config({"ucm_config_file": str(path), "cache_capacity": 7})
    assert (config.cache_capacity, config.prefetch_enabled) == (7, True)


def test_gsa_fragment_of_seed_section_5(tmp_path):
    path = tmp_path / "gsa.yaml"
    path.write_text("local_window_sz: 4\ninit_window_sz: 1\nmin_blocks: 8\n")
    assert load_gsa_fragment(str(path)) == GSAConfig(local_window_sz=4, init_window_sz=1, min_blocks=8)


@pytest.mark.parametrize("raw, message", [
    ({"buffer_numbr": 1024}, "unknown key 'buffer_numbr' in the connector config: did you mean 'buffer_number'?"),
    ({"cache_capcity": 1}, "did you mean 'cache_capacity', 'storage_capacity'?"),
    ({"buffer_number": "2048"}, "buffer_number: expected int, got str '2048'"),
    ({"buffer_number": 0}, "buffer_number: 0 is out of range; allowed: >= 1"),
    ({"prefetch_enabled": "yes"}, "prefetch_enabled: expected bool, got str 'yes'"),
    ({"path_strategy": "random"}, "path_strategy: 'random' is not allowed; allowed: 'round_robin', 'hash'"),
    ({"store_pipeline": "Cache|Disk"}, "store_pipeline: unknown tier 'Disk' in 'Cache|Disk'"),
    ({"store_pipeline": "Posix|Cache"}, "Cache (pinned DRAM) must come first"),
    ({"store_pipeline": "Cache|Posix|Posix"}, "names a tier twice"),
    ({"storage_backends": ["/a", 3]}, "storage_backends: expected list of str, got tuple ('/a', 3)"),
    ({"pinned_pool_size": 1 << 33}, "pinned_pool_size: 8589934592 exceeds max_pinned_size 4294967296"),
    ({"multipart_chunk_size": 1 << 20}, "multipart_chunk_size: 1048576 is out of range; allowed: >= 5242880"),
    ({"block_size": True}, "block_size: expected int or null, got bool True"),
    ({"load_async": "sometimes"}, "load_async: 'sometimes' is not allowed; allowed: 'auto', 'always', 'never'"),
    ({"metrics_port": 70000}, "metrics_port: 70000 is out of range; allowed: >= 0 and <= 65535"),
    ({"metrics_port": "9477"}, "metrics_port: expected int or null, got str '9477'"),
])
def test_store_errors_name_key_value_and_allowed(raw, message):
    with pytest.raises(ConfigError) as err:
        load_store_config(raw)
    assert message in str(err.value)


@pytest.mark.parametrize("sections, message", [
    ({"ucm_sparse_method": "Quest"}, "ucm_sparse_method: 'Quest' is not a known method; allowed: GSA"),
    ({"ucm_sparse_config": {"GSA": {"sparse_ration": 0.3}}},
     "unknown key 'sparse_ration' in ucm_sparse_config.GSA: did you mean 'sparse_ratio'?"),
    ({"ucm_sparse_config": {"GSA": {"sparse_ratio": 1.5}}},
     "ucm_sparse_config.GSA: sparse_ratio: 1.5 is out of range; allowed: > 0.0 and <= 1.0"),
    ({"ucm_sparse_config": {"GSA": {"sparse_ratio": 0}}}, "sparse_ratio: 0 is out of range"),
    ({"ucm_sparse_config": {"GSA": {"score": "max"}}}, "score: 'max' is not allowed; allowed: 'quest', 'mean'"),
    ({"ucm_sparse_config": {"GSA": {"dense_first_layers": -1}}},
     "ucm_sparse_config.GSA: dense_first_layers: -1 is out of range; allowed: >= 0"),
    ({"ucm_sparse_config": {"gsa": {}}}, "unknown key 'gsa' in ucm_sparse_config: did you mean 'GSA'?"),
    ({"ucm_sparse_config": {"GSA": {"select_drift": 0.1}}},
     "select_drift: 0.1 needs select_every > 1 (at select_every 1 every step selects afresh"),
    ({"ucm_sparse_config": {"GSA": {"select_drift": 0, "select_every": 4}}},
     "ucm_sparse_config.GSA: select_drift: 0 is out of range; allowed: > 0.0 and <= 1.0"),
])
def test_sparse_errors(sections, message):
    with pytest.raises(ConfigError) as err:
        parse_sparse(sections)
    assert message in str(err.value)


def test_document_errors(tmp_path):
    with pytest.raises(ConfigError, match="ucm_connectors\\[0\\].ucm_connector_name: 'Foo' is not a known connector"):
        parse_connectors({"ucm_connectors": [{"ucm_connector_name": "Foo", "ucm_connector_config": {}}]})
    with pytest.raises(ConfigError, match="unknown key 'ucm_conectors' .*did you mean 'ucm_connectors'"):
        parse_connectors({"ucm_conectors": []})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_store_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("store_pipeline: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_store_config(str(bad))
    with pytest.raises(ConfigError, match="exactly one"):
        load_store_config({"ucm_connectors": [{"ucm_connector_config": {}}, {"ucm_connector_config": {}}]})


def test_duplicate_yaml_key_warns_and_last_wins(tmp_path, caplog):
    path = tmp_path / "dup.yaml"
    path.write_text("buffer_number: 1024\n\nbuffer_number: 2048\n\nbuffer_number: 4096\n")
    assert load_store_config(str(path)).buffer_number == 4096
    assert "given more than once" in caplog.text


def test_recommended_buffer_number():
    assert recommended_buffer_number(4, 32) == 1024
    assert recommended_buffer_number(64, 32) == 4096
    with pytest.raises(ValueError, match="concurrent_requests=0"):
        recommended_buffer_number(0, 32)


def test_configuration_reference_lists_every_key_as_generated():
    from pathlib import Path

    from ucm.cli import reference_tables

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert reference_tables() in doc


@pytest.mark.parametrize("tier", TIER_NAMES)
def test_each_tier_is_built_from_exactly_the_keys_documented_as_its_own(tier):
    """A tier's slice holds the keys whose ``used_by`` names it (the configuration reference is generated from
    ``used_by``), with the config's values."""
    config = StoreConfig(s3_bucket="b", mooncake_master="m:1", cache_capacity=7, storage_backends=("/x",))
    settings = config.tier_settings(tier)
    documented = {f.name for f in dataclasses.fields(StoreConfig)
                  if tier in [name.strip() for name in f.metadata["used_by"].split(",")]}
    assert {f.name for f in dataclasses.fields(settings)} == documented
    assert all(getattr(settings, key) == getattr(config, key) for key in documented)


def test_tier_settings_keep_secrets_out_of_their_repr_and_name_an_unknown_tier():
    settings = StoreConfig(s3_secret_access_key="hunter2", s3_session_token="tok3n").tier_settings("DS3FS")
    assert "hunter2" not in repr(settings) and "tok3n" not in repr(settings)
    with pytest.raises(ValueError, match="tier: got 'Disk', expected one of Cache, Posix"):
        StoreConfig().tier_settings("Disk")
