"""Store configuration: the tuning guide's ``ucm_connector_config`` keys as a typed dataclass, its connectors, and
each tier's slice of the keys.

A source is any config document :mod:`ucm_config.document` reads (a dict or a YAML path, bare or whole); the
``ucm_sparse_*`` keys beside the store's are ``ucm_sparse.config``'s. A tier is built from its slice
(:meth:`StoreConfig.tier_settings`), never from the whole config.
"""
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ucm_config import (DOCUMENT_KEYS, SPARSE_KEYS, ConfigError, close_keys, parse_section, read_document,
                        reject_unknown, shown, spec, validate_fields)

GiB = 1 << 30
MiB = 1 << 20
TIER_NAMES = ("Cache", "Posix", "NFS", "DS3FS", "Mooncake")
CONNECTOR_NAMES = ("UcmPipelineStore",)
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
    max_concurrent_requests: int = spec(32, "requests in flight to the object store or Mooncake", min=1,
                                        max=65536, used_by="DS3FS, Mooncake")
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

    def tier_settings(self, tier: str) -> "CacheSettings | DiskTierSettings | S3Settings | MooncakeSettings":
        """The slice of the keys tier ``tier`` (one of TIER_NAMES) is built from."""
        if tier not in TIER_SETTINGS:
            raise ValueError(f"tier: got {tier!r}, expected one of {', '.join(TIER_NAMES)}")
        cls = TIER_SETTINGS[tier]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

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
class CacheSettings:
    """The Cache tier's keys (:meth:`StoreConfig.tier_settings`; meanings in StoreConfig)."""

    cache_capacity: int


@dataclasses.dataclass(frozen=True)
class DiskTierSettings:
    """The Posix and NFS tiers' keys."""

    storage_backends: tuple[str, ...]
    path_strategy: str
    use_direct_io: bool
    storage_capacity: int


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """The DS3FS (S3-protocol) tier's keys; the secrets stay out of the repr."""

    s3_bucket: str
    s3_endpoint: str
    s3_region: str
    s3_access_key_id: str
    s3_secret_access_key: str = dataclasses.field(repr=False)
    s3_session_token: str = dataclasses.field(repr=False)
    connection_pool_size: int
    max_concurrent_requests: int
    use_io_uring: bool
    multipart_threshold: int
    multipart_chunk_size: int
    remote_timeout: float
    remote_retry_interval: float
    remote_key_prefix: str


@dataclasses.dataclass(frozen=True)
class MooncakeSettings:
    """The Mooncake tier's keys."""

    mooncake_master: str
    mooncake_metadata_server: str
    mooncake_local_hostname: str
    mooncake_protocol: str
    mooncake_rdma_devices: str
    mooncake_global_segment_size: int
    mooncake_local_buffer_size: int
    max_concurrent_requests: int
    remote_timeout: float
    remote_retry_interval: float
    remote_key_prefix: str


TIER_SETTINGS = {"Cache": CacheSettings, "Posix": DiskTierSettings, "NFS": DiskTierSettings, "DS3FS": S3Settings,
                 "Mooncake": MooncakeSettings}


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


def parse_connectors(source: str | Path | Mapping) -> list[ConnectorSpec]:
    """Every connector a config source declares (one for a bare connector config), validated."""
    doc = read_document(source)
    if "ucm_connectors" in doc:
        reject_unknown(doc, DOCUMENT_KEYS, "the config document")
        entries = doc["ucm_connectors"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError("ucm_connectors: expected a non-empty list of connectors, got "
                              f"{shown(entries, contents=False)}")
        return [_parse_entry(entry, i) for i, entry in enumerate(entries)]
    if "ucm_connector_config" in doc:
        reject_unknown(doc, DOCUMENT_KEYS, "the config document")
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


def _parse_entry(entry: Any, index: int) -> ConnectorSpec:
    where = f"ucm_connectors[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping with ucm_connector_name and ucm_connector_config, "
                          f"got {shown(entry, contents=False)}")
    reject_unknown(entry, ("ucm_connector_name", "ucm_connector_config"), where)
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


