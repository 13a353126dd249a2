"""Store configuration: the tuning guide's ``ucm_connector_config`` keys as a typed dataclass, and config documents.

Accepted sources (a dict, or a path to a YAML file holding one):

* a bare connector config: ``{"store_pipeline": "Cache|Posix", "storage_backends": "/data/ucm_cache", ...}``
  (the tuning guide's section 6.1 dict; also vLLM's ``kv_connector_extra_config``);
* ``{"ucm_connector_config": {...}}`` (the tuning guide's sections 4.1 and 4.4);
* a whole document: ``{"ucm_connectors": [{"ucm_connector_name": ..., "ucm_connector_config": {...}}],
  "ucm_sparse_method": "GSA", "ucm_sparse_config": {"GSA": {...}}}`` (the tuning guide's section 8);
* ``{"ucm_config_file": "path.yaml", ...}``: that file, with any other store keys given beside it overriding it.

``ucm_sparse_method`` and ``ucm_sparse_config`` are accepted here and validated by ``ucm_sparse.config``.
"""
import dataclasses
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ucm_store.configspec import ConfigError, close_keys, parse_section, shown, spec, validate_fields

logger = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20
TIER_NAMES = ("Cache", "Posix", "NFS", "DS3FS", "Mooncake")
CONNECTOR_NAMES = ("UcmPipelineStore",)
SPARSE_KEYS = ("ucm_sparse_method", "ucm_sparse_config")
DOCUMENT_KEYS = ("ucm_connectors", "ucm_connector_config", "ucm_config_file") + SPARSE_KEYS
SECRET_KEYS = ("s3_secret_access_key", "s3_session_token")  # masked in reprs, never logged
LOAD_ASYNC_CHOICES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """One connector's store settings (the tuning guide's ``ucm_connector_config``)."""

    store_pipeline: str = spec("Cache|Posix", "tiers left to right, '|'-separated: " + ", ".join(TIER_NAMES),
                               used_by="pipeline")
    storage_backends: tuple[str, ...] = spec((), "directory, or list of directories, of the Posix / NFS tiers",
                                             used_by="Posix, NFS")
    buffer_number: int = spec(1024, "block transfers in flight at most; tuning guide rule: max(1024, requests x "
                              "layers x 2)", min=1, used_by="pipeline")
    pinned_pool_size: int = spec(GiB, "bytes of pinned host memory reserved at start", min=4096,
                                 used_by="pinned pool")
    max_pinned_size: int = spec(4 * GiB, "bytes the pinned pool may grow to, never more", min=4096,
                                used_by="pinned pool")
    block_size: int | None = spec(None, "tokens per KV block; must equal vLLM's (unset: take vLLM's)", min=1,
                                  max=4096, used_by="hashing, vLLM connector")
    load_async: str = spec("auto", "load prompt hits between steps, the request parked meanwhile; auto: when a hit "
                           "block lies below the Cache tier (a Cache hit is a memory copy, loaded in the step)",
                           choices=LOAD_ASYNC_CHOICES, used_by="vLLM connector")
    metrics_port: int | None = spec(None, "serve UCM's Prometheus /metrics from each vLLM worker process at this port "
                                    "plus its rank (0: any free port, logged); unset: no endpoint", min=0, max=65535,
                                    used_by="vLLM connector")
    metrics_addr: str = spec("127.0.0.1", "address the metrics endpoint listens on (0.0.0.0: every interface)",
                             used_by="vLLM connector")
    cache_capacity: int = spec(10000, "blocks held by the Cache (pinned DRAM) tier", min=1, used_by="Cache")
    prefetch_enabled: bool = spec(False, "read ahead the following blocks of a prefix on a lookup hit",
                                  used_by="pipeline")
    prefetch_depth: int = spec(4, "blocks read ahead when prefetch_enabled", min=0, max=1024, used_by="pipeline")
    use_direct_io: bool = spec(False, "O_DIRECT file I/O with aligned buffers", used_by="Posix, NFS")
    path_strategy: str = spec("round_robin", "how blocks spread over several storage_backends",
                              choices=("round_robin", "hash"), used_by="Posix, NFS")
    connection_pool_size: int = spec(16, "open connections to the object store", min=1, max=4096, used_by="DS3FS")
    max_concurrent_requests: int = spec(32, "requests in flight to the object store", min=1, max=65536,
                                        used_by="DS3FS")
    use_io_uring: bool = spec(False, "accepted for the tuning guide's configs; io_uring is not used (see docs)",
                              used_by="DS3FS")
    multipart_threshold: int = spec(8 * MiB, "objects at least this large upload in parts", min=5 * MiB,
                                    used_by="DS3FS")
    multipart_chunk_size: int = spec(8 * MiB, "part size of multipart uploads", min=5 * MiB, used_by="DS3FS")
    io_workers: int | None = spec(None, "worker threads for file / network I/O; unset: the CPU count, at most 8 "
                                        "(threads beyond the cores slow page-cache hits down)", min=1, max=512,
                                  used_by="every tier")
    storage_capacity: int = spec(0, "bytes a disk tier may hold, least recently used evicted; 0: no bound", min=0,
                                 used_by="Posix, NFS")
    remote_timeout: float = spec(5.0, "seconds one request to the object store or Mooncake may take; then it fails",
                                 min=0.05, max=600, used_by="DS3FS, Mooncake")
    remote_retry_interval: float = spec(2.0, "seconds a remote tier that failed answers misses before it tries again",
                                        min=0, max=3600, used_by="DS3FS, Mooncake")
    remote_key_prefix: str = spec("ucm/", "prefix of every block's object name / key in the shared store",
                                  used_by="DS3FS, Mooncake")
    s3_bucket: str = spec("", "bucket of the blocks (empty: $AWS_BUCKET_NAME or $AWS_BUCKET)", used_by="DS3FS")
    s3_endpoint: str = spec("", "S3 endpoint URL, e.g. http://10.0.0.5:9000 (empty: $AWS_ENDPOINT_URL, else AWS)",
                            used_by="DS3FS")
    s3_region: str = spec("", "S3 region (empty: $AWS_REGION or $AWS_DEFAULT_REGION, else us-east-1)",
                          used_by="DS3FS")
    s3_access_key_id: str = spec("", "access key id (empty: $AWS_ACCESS_KEY_ID or the instance's credentials)",
                                 used_by="DS3FS")
    s3_secret_access_key: str = spec("", "secret access key, never logged (empty: $AWS_SECRET_ACCESS_KEY)",
                                     used_by="DS3FS", secret=True)
    s3_session_token: str = spec("", "session token of temporary credentials, never logged (empty: $AWS_SESSION_TOKEN)",
                                 used_by="DS3FS", secret=True)
    mooncake_master: str = spec("", "host:port of the Mooncake master (required by the Mooncake tier)",
                                used_by="Mooncake")
    mooncake_metadata_server: str = spec("P2PHANDSHAKE", "transfer-engine metadata: P2PHANDSHAKE (no service), "
                                         "http://host:port/metadata or etcd://host:port", used_by="Mooncake")
    mooncake_local_hostname: str = spec("", "address other nodes reach this one at (empty: the local address that "
                                        "routes to the master)", used_by="Mooncake")
    mooncake_protocol: str = spec("tcp", "Mooncake transfer protocol (CI tests tcp)", choices=("tcp", "rdma"),
                                  used_by="Mooncake")
    mooncake_rdma_devices: str = spec("", "RDMA devices for mooncake_protocol rdma, comma-separated (empty: all)",
                                      used_by="Mooncake")
    mooncake_global_segment_size: int = spec(0, "bytes of this node's memory lent to the Mooncake pool (0: none; "
                                             "blocks live on storage nodes)", min=0, used_by="Mooncake")
    mooncake_local_buffer_size: int = spec(128 * MiB, "bytes of this node's Mooncake transfer buffer; more than "
                                           "one block", min=MiB, used_by="Mooncake")

    def __post_init__(self) -> None:
        if isinstance(self.storage_backends, str):
            object.__setattr__(self, "storage_backends", (self.storage_backends,))
        validate_fields(self)
        if self.io_workers is None:
            object.__setattr__(self, "io_workers", default_io_workers())
        self._check_relations()

    def __repr__(self) -> str:
        """The dataclass repr with the secrets of SECRET_KEYS masked."""
        def value_of(name: str) -> str:
            value = getattr(self, name)
            return "'***'" if name in SECRET_KEYS and value else repr(value)
        return f"StoreConfig({', '.join(f'{f.name}={value_of(f.name)}' for f in dataclasses.fields(self))})"

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tier names of ``store_pipeline`` in order, e.g. ``("Cache", "Posix")``."""
        return tuple(tier.strip() for tier in self.store_pipeline.split("|"))

    def _check_relations(self) -> None:
        tiers = [t.strip() for t in self.store_pipeline.split("|")]
        for tier in tiers:
            if tier not in TIER_NAMES:
                raise ConfigError(f"store_pipeline: unknown tier {tier!r} in {self.store_pipeline!r}; "
                                  f"allowed tiers: {', '.join(TIER_NAMES)} joined by '|'")
        if len(set(tiers)) != len(tiers):
            raise ConfigError(f"store_pipeline: {self.store_pipeline!r} names a tier twice; each tier at most once")
        if "Cache" in tiers and tiers[0] != "Cache":
            raise ConfigError(f"store_pipeline: {self.store_pipeline!r} puts Cache below another tier; "
                              "Cache (pinned DRAM) must come first")
        if any(not path for path in self.storage_backends):
            raise ConfigError(f"storage_backends: {list(self.storage_backends)!r} has an empty path")
        if self.pinned_pool_size > self.max_pinned_size:
            raise ConfigError(f"pinned_pool_size: {self.pinned_pool_size} exceeds max_pinned_size "
                              f"{self.max_pinned_size}; allowed: pinned_pool_size <= max_pinned_size")


@dataclasses.dataclass(frozen=True)
class ConnectorSpec:
    """One entry of ``ucm_connectors``: a connector name and its store config."""

    name: str
    config: StoreConfig


def default_io_workers() -> int:
    """I/O threads when ``io_workers`` is unset: the CPU count, at most 8. A block read from the page cache is
    mostly Python work under the GIL, so threads beyond the cores only contend: 128 warm 128 KiB loads on 2 cores
    took 41-54 ms with 1-2 threads, 53-60 ms with 4, 88-89 ms with 8."""
    return max(1, min(8, os.cpu_count() or 1))


def recommended_buffer_number(concurrent_requests: int, num_layers: int) -> int:
    """The tuning guide's sizing rule: ``max(1024, concurrent_requests x num_layers x 2)``."""
    if concurrent_requests < 1 or num_layers < 1:
        raise ValueError(f"concurrent_requests={concurrent_requests}, num_layers={num_layers}: both must be >= 1")
    return max(1024, concurrent_requests * num_layers * 2)


def read_document(source: str | Path | Mapping) -> dict:
    """The raw config document from a dict or a YAML file path, with ``ucm_config_file`` resolved."""
    if isinstance(source, (str, Path)):
        raw = _read_yaml(Path(source))
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raise ConfigError(f"config must be a dict or a YAML file path, got {type(source).__name__}")
    if "ucm_config_file" in raw:
        path = raw["ucm_config_file"]
        if not isinstance(path, (str, Path)):
            raise ConfigError("ucm_config_file: expected the path of a YAML file, got "
                              f"{shown(path, contents=False)}")
        overrides = {k: v for k, v in raw.items() if k != "ucm_config_file"}
        raw = _apply_overrides(_read_yaml(Path(path)), overrides)
    return raw


def parse_connectors(source: str | Path | Mapping) -> list[ConnectorSpec]:
    """Every connector a config source declares (one for a bare connector config), validated."""
    doc = read_document(source)
    if "ucm_connectors" in doc:
        _reject_unknown(doc, DOCUMENT_KEYS, "the config document")
        entries = doc["ucm_connectors"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError("ucm_connectors: expected a non-empty list of connectors, got "
                              f"{shown(entries, contents=False)}")
        return [_parse_entry(entry, i) for i, entry in enumerate(entries)]
    if "ucm_connector_config" in doc:
        _reject_unknown(doc, DOCUMENT_KEYS, "the config document")
        return [ConnectorSpec(CONNECTOR_NAMES[0], parse_section(StoreConfig, doc["ucm_connector_config"],
                                                                "ucm_connector_config"))]
    flat = {k: v for k, v in doc.items() if k not in SPARSE_KEYS}
    return [ConnectorSpec(CONNECTOR_NAMES[0], _parse_flat(flat))]


def load_store_config(source: str | Path | Mapping) -> StoreConfig:
    """The store config of a source that declares exactly one connector (the factory's input)."""
    connectors = parse_connectors(source)
    if len(connectors) != 1:
        raise ConfigError(f"ucm_connectors: {len(connectors)} connectors given; a store is created from exactly one")
    return connectors[0].config


def sparse_sections(source: str | Path | Mapping) -> dict:
    """The raw ``ucm_sparse_method`` / ``ucm_sparse_config`` entries of a source, for ``ucm_sparse.config``."""
    doc = read_document(source)
    return {key: doc[key] for key in SPARSE_KEYS if key in doc}


def _parse_entry(entry: Any, index: int) -> ConnectorSpec:
    where = f"ucm_connectors[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with ucm_connector_name and ucm_connector_config, "
                          f"got {shown(entry, contents=False)}")
    _reject_unknown(entry, ("ucm_connector_name", "ucm_connector_config"), where)
    name = entry.get("ucm_connector_name", CONNECTOR_NAMES[0])
    if name not in CONNECTOR_NAMES:
        raise ConfigError(f"{where}.ucm_connector_name: {name!r} is not a known connector; "
                          f"allowed: {', '.join(CONNECTOR_NAMES)}")
    return ConnectorSpec(name, parse_section(StoreConfig, entry.get("ucm_connector_config"),
                                             f"{where}.ucm_connector_config"))


def _parse_flat(flat: Mapping) -> StoreConfig:
    known = [f.name for f in dataclasses.fields(StoreConfig)]
    for key in flat:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in the connector config: "
                              f"{close_keys(str(key), known + list(DOCUMENT_KEYS))}")
    return parse_section(StoreConfig, flat, "the connector config")


def _reject_unknown(mapping: Mapping, allowed: tuple, where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}: {close_keys(str(key), list(allowed))}")


def _apply_overrides(doc: dict, overrides: dict) -> dict:
    """Store keys given beside ``ucm_config_file`` override the file's (single) connector config."""
    sparse = {k: overrides.pop(k) for k in SPARSE_KEYS if k in overrides}
    doc = {**doc, **sparse}
    if not overrides:
        return doc
    if "ucm_connectors" in doc:
        entries = doc["ucm_connectors"]
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], Mapping):
            raise ConfigError("ucm_config_file: keys beside it override a file with exactly one connector; "
                              f"its ucm_connectors is {shown(entries, contents=False)}")
        entry = dict(entries[0])
        entry["ucm_connector_config"] = _merged(entry.get("ucm_connector_config"), overrides,
                                                "ucm_connectors[0].ucm_connector_config")
        return {**doc, "ucm_connectors": [entry]}
    if "ucm_connector_config" in doc:
        return {**doc, "ucm_connector_config": _merged(doc["ucm_connector_config"], overrides, "ucm_connector_config")}
    return {**doc, **overrides}


def _merged(section: Any, overrides: dict, where: str) -> dict:
    """The file's connector config ``section`` with ``overrides`` on top; ConfigError if it is not a mapping."""
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"{where} in the ucm_config_file must be a mapping of keys to values, got "
                          f"{shown(section, contents=False)}")
    return {**(section or {}), **overrides}


class _WarnOnDuplicateLoader(yaml.SafeLoader):
    """A YAML SafeLoader that logs keys given twice in one mapping (the later value wins, as in YAML)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the SafeLoader rejects it below, naming the line
            if key in seen:
                logger.warning("config key %r is given more than once (line %d); the last value wins",
                               key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path, or text that is not UTF-8
        raise ConfigError(f"config file {str(path)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        doc = yaml.load(text, Loader=_WarnOnDuplicateLoader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top, got {type(doc).__name__}")
    if "ucm_config_file" in doc:
        raise ConfigError(f"config file {str(path)!r} names ucm_config_file itself; nesting is not allowed")
    return doc


def _yaml_problem(exc: BaseException) -> str:
    """What is wrong and where, without the YAML parser's quote of the offending line (it may hold a secret)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"{exc.reason} at character {exc.position}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
