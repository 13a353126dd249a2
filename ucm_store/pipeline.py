"""UcmPipelineStore: the store contract over a chain of tiers (``store_pipeline: "Cache|Posix"``); its write-down
(``ucm_store.writedown``) and promotion (``ucm_store.promotion``) live apart.

* ``dump(block_ids, offset, tensor)`` copies part ``i`` of ``tensor`` into bytes ``[offset, offset + part)`` of
  block ``i``, staged in pinned DRAM and invisible to lookups. ``tensor`` holds ``len(block_ids)`` equal parts
  back to back (its first dimension is usually the block index; one block may take the whole tensor). Several
  dumps at different offsets may build one block (e.g. one per layer); together they must cover it from byte 0
  without gaps or overlaps.
* ``commit(block_ids, success_flags)`` publishes each successfully dumped block atomically into the top tier
  (Cache: the staged buffer itself; a disk tier: temp file, fsync, rename) and queues its write-down to the
  tiers below (bounded by ``buffer_number``; ``flush()`` waits for them); with ``write_through=True`` the calling
  thread writes them down before returning instead. A failed flag discards the block.
* ``lookup`` / ``lookup_on_prefix`` see committed blocks in any tier (``lookup_prefix_tiers`` also names the
  tier of each leading hit); ``load(block_ids, offset, tensor)`` reads bytes ``[offset, offset + part)`` of
  each block into part ``i`` of ``tensor``, from the first tier holding it, and promotes blocks found below
  into the Cache (one read per block however many loads want it).
* A load verifies a block (length, CRC32) in a staging buffer before any byte reaches ``tensor``: a failed
  load leaves the destination untouched.
* ``dump`` and ``load`` return a :class:`~ucm_store.task.Task`; ``wait(task)`` returns ``TaskStatus.SUCCESS``
  (0) or ``FAILURE`` with ``task.failures`` naming each failed block and its cause; ``check(task)`` polls.
* Bad arguments (ids, offset, a tensor that is not dense, contiguous, on the CPU or a GPU, or does not split into
  equal parts) raise ValueError at the call; a range past the stored block fails that block's task.
* When the pinned pool is full, a dump or load waits for buffers to be released (backpressure) for up to
  ``alloc_timeout`` seconds, then fails that block (PoolExhaustedError in ``task.failures``); nothing crashes.

Tensors may live on the CPU or a GPU. Block ids are opaque bytes, stored under a BLAKE2b key, never raw.
"""
import contextlib
import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ucm_store.backends.base import Tier
from ucm_store.backends.cache import CacheTier
from ucm_store.config import default_io_workers
from ucm_store.front import CacheFront, DirectFront
from ucm_store.metrics import StatsMonitor
from ucm_store.pool import STORE_WAIT_SECONDS, PinnedMemoryPool, PoolExhaustedError
from ucm_store.task import Task, TaskStatus, finished_future
from ucm_store.writedown import WriteDown

logger = logging.getLogger(__name__)
MAX_BLOCK_ID_BYTES = 4096
TENSOR_DEVICES = ("cpu", "cuda")  # device types a dump or load tensor may live on (a meta tensor holds no bytes)


def block_key(block_id: bytes) -> str:
    """The storage key of a block id: 32 hex digits of BLAKE2b-128 (never the raw id, which may hold '/')."""
    return hashlib.blake2b(block_id, digest_size=16).hexdigest()


class _Staged:
    """The parts of one dumped, uncommitted block: (offset, pool buffer) pairs and their futures."""

    def __init__(self):
        self.parts: list[tuple[int, torch.Tensor]] = []
        self.futures: list[Future] = []


class UcmPipelineStore:
    """A block store over tiers tried left to right; see the module docstring for the contract."""

    def __init__(self, tiers: list[Tier], pool: PinnedMemoryPool, *, io_workers: int | None = None,
                 writeback_depth: int = 1024, prefetch_depth: int = 0, monitor: StatsMonitor | None = None,
                 alloc_timeout: float = STORE_WAIT_SECONDS):
        if not tiers:
            raise ValueError("tiers: a store needs at least one tier")
        self.tiers = tiers
        self.pool = pool
        self.monitor = monitor or StatsMonitor.get_instance()
        io_workers = io_workers or default_io_workers()
        self._io = ThreadPoolExecutor(io_workers, thread_name_prefix="ucm-io")
        self._staged: dict[str, _Staged] = {}
        self._lock = threading.Lock()
        if isinstance(tiers[0], CacheTier):
            self.front = CacheFront(tiers, pool, self._io, self.monitor, alloc_timeout=alloc_timeout,
                                    io_workers=io_workers, writeback_depth=writeback_depth,
                                    prefetch_depth=prefetch_depth)
        else:
            self.front = DirectFront(tiers, pool, self._io, self.monitor, alloc_timeout=alloc_timeout)
        self.monitor.watch_store(self)  # tier occupancy and pool usage in the metrics

    @property
    def cache(self) -> CacheTier | None:
        """The Cache tier at the top of the pipeline, if there is one."""
        return self.front.cache

    @property
    def write_down(self) -> WriteDown:
        """The queue of committed blocks on their way to the lower tiers (inactive without a Cache tier)."""
        return self.front.write_down

    @property
    def writeback_failures(self) -> int:
        """Blocks whose copies in the lower tiers failed (they stay in the Cache tier only)."""
        return self.write_down.failures

    # ---- lookups ---------------------------------------------------------------------------------------------
    def lookup(self, block_ids: list[bytes]) -> list[bool]:
        """One flag per id: is a committed copy of the block in any tier."""
        keys = [block_key(b) for b in check_block_ids(block_ids)]
        where = [self._tier_of(key) for key in keys]
        self._record_lookup(where)
        self.front.prefetch([k for k, t in zip(keys, where) if t is not None and t is not self.cache])
        return [t is not None for t in where]

    def lookup_on_prefix(self, block_ids: list[bytes]) -> int:
        """Index of the last block of the leading run of hits (-1 when the first block misses)."""
        return len(self.lookup_prefix_tiers(block_ids)) - 1

    def lookup_prefix_tiers(self, block_ids: list[bytes]) -> list[str]:
        """The name of the tier holding each block of the leading run of hits (e.g. ``["Cache", "Posix"]``; empty
        when the first block misses): the first tier a load would read it from, so ``"Cache"`` means a memory
        copy and any other name means I/O. Counts and prefetches like ``lookup_on_prefix``."""
        keys = [block_key(b) for b in check_block_ids(block_ids)]
        where = []
        for key in keys:
            tier = self._tier_of(key)
            if tier is None:
                break
            where.append(tier)
        self._record_lookup(where + [None] * (len(keys) - len(where)))  # every queried block counts (StatsMonitor)
        self.front.prefetch([k for k, t in zip(keys, where) if t is not self.cache])
        return [tier.name for tier in where]

    # ---- dump and commit -------------------------------------------------------------------------------------
    def dump(self, block_ids: list[bytes], offset: int, tensor: torch.Tensor) -> Task:
        """Stage part ``i`` of ``tensor`` at byte ``offset`` of block ``i``; asynchronous (see module doc).

        Parts of a CPU tensor are staged on the calling thread (a memory copy; the task is then already done);
        parts on a GPU are copied by the I/O workers.
        """
        parts = _split_parts(block_ids, offset, tensor)
        inline = tensor.device.type == "cpu"
        futures = []
        for block_id, part in zip(block_ids, parts):
            key = block_key(block_id)
            if self._tier_of(key) is not None:
                futures.append(finished_future())
                continue
            with self._lock:
                staged = self._staged.setdefault(key, _Staged())
            future = _run_now(self._stage_part, key, offset, part) if inline else self._io.submit(
                self._stage_part, key, offset, part)
            staged.futures.append(future)
            futures.append(future)
        return Task("dump", list(block_ids), futures)

    def stage_buffers(self, block_ids: list[bytes], nbytes: int) -> list[torch.Tensor | None]:
        """Pinned pool buffers of ``nbytes`` (uint8) to write whole blocks into in place, e.g. by a GPU kernel
        over PCIe, instead of :meth:`dump` copying them in: ``None`` for a block already stored (or, when the
        pool stays full for ``alloc_timeout`` s, that cannot be staged). Write each buffer completely, then
        :meth:`commit` (True publishes, False discards); nothing is visible to lookups before."""
        check_block_ids(block_ids)
        buffers = []
        for block_id in block_ids:
            key = block_key(block_id)
            buffers.append(None if self._tier_of(key) is not None else self._stage_buffer(key, nbytes))
        return buffers

    @contextlib.contextmanager
    def hold_cached(self, block_ids: list[bytes]):
        """Yield the Cache tier's buffer of each block (``None`` where the block is not in the Cache), kept
        from eviction until the ``with`` block ends: read them in place (e.g. a GPU kernel over PCIe), never
        write them. Counts the held blocks as loads."""
        with self.front.hold([block_key(block_id) for block_id in block_ids]) as buffers:
            yield buffers

    def commit(self, block_ids: list[bytes], success_flags: list[bool], write_through: bool = False) -> list[bool]:
        """Publish (flag True) or discard (False) each dumped block; returns which blocks are now committed.

        ``write_through``: the calling thread also writes the newly published blocks down to every lower tier
        before returning (a process killed right after keeps them), instead of the background writers, whose
        delay depends on how busy the host's cores are (they run at the lowest priority)."""
        check_block_ids(block_ids)
        if len(success_flags) != len(block_ids):
            raise ValueError(f"success_flags: {len(success_flags)} flags for {len(block_ids)} block_ids; "
                             "need one flag per block id")
        return self.front.commit_all(self._commit_one, block_ids, [bool(f) for f in success_flags], write_through)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write-down to the lower tiers has finished."""
        self.write_down.flush(timeout)

    # ---- load ------------------------------------------------------------------------------------------------
    def load(self, block_ids: list[bytes], offset: int, tensor: torch.Tensor) -> Task:
        """Read bytes ``[offset, offset + part)`` of block ``i`` into part ``i`` of ``tensor``; asynchronous.

        Blocks already in the Cache tier are copied on the calling thread; the others by the I/O workers.
        """
        parts = _split_parts(block_ids, offset, tensor)
        futures = []
        for block_id, part in zip(block_ids, parts):
            key = block_key(block_id)
            if self.front.copy_cached(key, offset, part):
                futures.append(finished_future())
            else:
                futures.append(self._io.submit(self._load_part, key, offset, part))
        return Task("load", list(block_ids), futures)

    def promote(self, block_ids: list[bytes]) -> Task:
        """Bring each block into the Cache tier, read (and verified) from the first lower tier holding it, by
        the I/O workers; asynchronous. Then read it in place with :meth:`hold_cached`. ValueError without a
        Cache tier."""
        check_block_ids(block_ids)
        return Task("load", list(block_ids), [self.front.promote(block_key(block_id)) for block_id in block_ids])

    def wait(self, task: Task, timeout: float | None = None) -> TaskStatus:
        """Block until ``task`` finishes; SUCCESS (0) or FAILURE (``task.failures`` names blocks and causes)."""
        return task.wait(timeout)

    def check(self, task: Task) -> bool:
        """True once ``task`` has finished (then ``wait`` returns at once)."""
        return task.done()

    def close(self) -> None:
        """Drain pending write-downs, stop the workers and release every buffer."""
        self.monitor.unwatch_store(self)
        self.write_down.close()
        self._io.shutdown(wait=True)
        with self._lock:
            staged, self._staged = list(self._staged.values()), {}
        for block in staged:
            self._release_parts(block)
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "UcmPipelineStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- workers ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _stage_part(self, key: str, offset: int, part: torch.Tensor) -> None:
        with self.monitor.transfer("save") as result:
            buf = self.front.allocate(part.numel())
            buf.copy_(part)
            with self._lock:
                self._staged.setdefault(key, _Staged()).parts.append((offset, buf))
            result["bytes"], result["blocks"] = part.numel(), 1

    def _stage_buffer(self, key: str, nbytes: int) -> torch.Tensor | None:
        try:
            buf = self.front.allocate(nbytes)
        except PoolExhaustedError as exc:
            logger.warning("block %s not staged: %s", key, exc)
            return None
        with self._lock:
            self._staged.setdefault(key, _Staged()).parts.append((0, buf))
        return buf

    def _commit_one(self, block_id: bytes, success: bool, inline: list | None = None) -> bool:
        """Publish or discard one staged block; a published block's write-down is queued, or appended to
        ``inline`` (the caller writes those down itself)."""
        key = block_key(block_id)
        with self._lock:
            staged = self._staged.pop(key, None)
        if staged is None:
            return self._tier_of(key) is not None
        failed = [f for f in staged.futures if f.exception(timeout=None) is not None]
        if not success or failed:
            self._release_parts(staged)
            return False
        try:
            buf = self._assemble(staged)
        except (ValueError, PoolExhaustedError) as exc:
            self._release_parts(staged)
            logger.error("commit of block %s failed: %s", block_id.hex(), exc)
            return False
        return self.front.publish(block_id, key, buf, inline)

    @torch.inference_mode()  # callers' tensors may be inference tensors (vLLM's); writing them needs the mode
    def _load_part(self, key: str, offset: int, part: torch.Tensor) -> None:
        with self.monitor.transfer("load") as result:
            self.front.load_part(key, offset, part)
            result["bytes"], result["blocks"] = part.numel(), 1

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _tier_of(self, key: str) -> Tier | None:
        return next((tier for tier in self.tiers if tier.contains(key)), None)

    def _record_lookup(self, where: list[Tier | None]) -> None:
        tier_hits: dict[str, int] = {}
        for tier in where:
            if tier is not None:
                tier_hits[tier.name] = tier_hits.get(tier.name, 0) + 1
        self.monitor.record_lookup(len(where), sum(tier_hits.values()), tier_hits)


    def _assemble(self, staged: _Staged) -> torch.Tensor:
        """One buffer holding the whole block, taken out of ``staged``; ValueError if the parts leave a gap or
        overlap, PoolExhaustedError if no buffer frees up (``staged`` keeps its parts then)."""
        parts = sorted(staged.parts, key=lambda p: p[0])
        end = 0
        for offset, buf in parts:
            if offset != end:
                kind = "a gap" if offset > end else "an overlap"
                raise ValueError(f"dumped parts leave {kind} at byte {min(offset, end)}; parts must tile the block")
            end = offset + buf.numel()
        if len(parts) == 1:
            staged.parts = []
            return parts[0][1]
        whole = self.front.allocate(end)
        for offset, buf in parts:
            whole[offset:offset + buf.numel()].copy_(buf)
        self._release_parts(staged)
        return whole

    def _release_parts(self, staged: _Staged) -> None:
        for _, buf in staged.parts:
            self.pool.release(buf)
        staged.parts = []


def check_block_ids(block_ids: list[bytes]) -> list[bytes]:
    """``block_ids`` as a list, after checking that it is a list of non-empty bytes of at most MAX_BLOCK_ID_BYTES
    each (ValueError naming the first that is not)."""
    if not isinstance(block_ids, (list, tuple)):
        raise ValueError(f"block_ids: expected a list of bytes, got {type(block_ids).__name__}")
    for i, block_id in enumerate(block_ids):
        if not isinstance(block_id, (bytes, bytearray)) or not 0 < len(block_id) <= MAX_BLOCK_ID_BYTES:
            raise ValueError(f"block_ids[{i}]: expected non-empty bytes of at most {MAX_BLOCK_ID_BYTES} bytes, "
                             f"got {type(block_id).__name__} {block_id!r:.60}")
    return list(block_ids)


def _split_parts(block_ids: list[bytes], offset: int, tensor: torch.Tensor) -> list[torch.Tensor]:
    """``tensor``'s bytes as ``len(block_ids)`` equal 1-D uint8 parts."""
    check_block_ids(block_ids)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset: expected a byte offset >= 0, got {offset!r}")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"tensor: expected a dense (strided) tensor, got layout {tensor.layout}")
    if tensor.device.type not in TENSOR_DEVICES:
        raise ValueError(f"tensor: on device {tensor.device}; allowed: {' or '.join(TENSOR_DEVICES)} tensors")
    if not tensor.is_contiguous():
        raise ValueError(f"tensor: must be contiguous (shape {tuple(tensor.shape)}, strides {tensor.stride()})")
    nbytes = tensor.numel() * tensor.element_size()
    if not block_ids or nbytes == 0 or nbytes % len(block_ids):
        raise ValueError(f"tensor: {nbytes} bytes do not split into {len(block_ids)} equal non-empty block parts")
    return list(tensor.reshape(-1).view(torch.uint8).view(len(block_ids), -1))


def _run_now(fn, *args) -> Future:
    """Run ``fn(*args)`` on this thread; its result or exception in a finished future."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # delivered through the task, like a worker's failure
        future.set_exception(exc)
    return future
