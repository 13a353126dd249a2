"""Mooncake tier: blocks in the Mooncake distributed store, a memory pool over the cluster's nodes, over TCP.

Deployment: one ``mooncake_master`` (placement, leases, eviction) at ``mooncake_master``, and nodes that lend memory
to the pool: storage nodes (``mooncake_client --global_segment_size 64GB --master_server_address HOST:PORT ...``) or
the serving nodes themselves (``mooncake_global_segment_size`` > 0). A block lives in the memory of the node holding
its replica: when that node leaves, its blocks become misses everywhere, and the master evicts blocks when the pool
fills. So this tier shares blocks between nodes but is not durable (put DS3FS or Posix below it for that).

Layout and visibility: block ``key`` is the object ``{remote_key_prefix}{key}``, a framed block
(:mod:`ucm_store.backends.framing`: the 64-byte header with magic, lengths, CRC32 and key digest, then the payload),
put as one object (``put_parts``). A Mooncake put is atomic per key: the key is readable only once its whole value is
written. Reads verify the header and CRC32; a corrupt object is removed and reported as BlockCorrupt.

Failures: every call runs on the tier's worker threads and the caller waits at most ``remote_timeout`` seconds; a
failure marks the master down for ``remote_retry_interval`` seconds (one warning per outage), during which the tier
answers at once: ``contains`` False, ``size`` None, ``read`` BlockMissing, ``put`` RemoteUnavailable. The client is
set up lazily at first use, and again after a failed setup; the master's port is probed first (a TCP connect bounded
by ``remote_timeout``) because Mooncake's setup retries an unreachable master for about 90 s. A set-up client
re-registers with a restarted master by itself (seen here within about 2 s), so it is kept across outages. At most
``max_concurrent_requests`` calls run at once.
"""
import logging
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from ucm_store.backends.base import BlockMissing
from ucm_store.backends.objects import FramedObjectTier
from ucm_store.backends.remote import RemoteGate, RemoteUnavailable
from ucm_store.config import MooncakeSettings

try:
    from mooncake.store import MooncakeDistributedStore
except ImportError as exc:
    raise ImportError("the Mooncake tier needs the 'mooncake-transfer-engine-non-cuda' package (or a CUDA build) and "
                      f"Debian's libibverbs1 librdmacm1 libnuma1: {exc}") from exc

logger = logging.getLogger(__name__)
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
PUT_REFUSALS = {  # status codes of a put the server answered but refused: the block is not stored, the tier is fine
    -200: "no room in the pool (-200 NO_AVAILABLE_HANDLE); add storage nodes or set mooncake_global_segment_size",
    -600: "no room in this node's transfer buffer (-600 INVALID_PARAMS); mooncake_local_buffer_size must hold the "
          "blocks in flight, each with its 64-byte header",
}


class MooncakeTier(FramedObjectTier):
    """Committed blocks as objects in a Mooncake store, shared by every node of the same master and key prefix."""

    name = "Mooncake"
    durable = False

    def __init__(self, master: str, gate: RemoteGate, *, metadata_server: str = "P2PHANDSHAKE",
                 local_hostname: str = "", protocol: str = "tcp", rdma_devices: str = "", global_segment_size: int = 0,
                 local_buffer_size: int = 128 << 20, key_prefix: str = "ucm/"):
        host, _, port = master.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"mooncake_master: expected host:port of the Mooncake master, got {master!r}")
        self.master = master
        self.master_address = (host, int(port))
        self.gate = gate
        self.key_prefix = key_prefix
        self._setup_args = (local_hostname, metadata_server, global_segment_size, local_buffer_size, protocol,
                            rdma_devices, master)
        self._workers = ThreadPoolExecutor(gate.max_concurrent, thread_name_prefix="ucm-mooncake")
        self._client: MooncakeDistributedStore | None = None
        self._connecting: Future | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, config: MooncakeSettings) -> "MooncakeTier":
        """The tier its slice of the store config describes (``mooncake_master`` checked present by the factory)."""
        gate = RemoteGate(cls.name, max_concurrent=config.max_concurrent_requests, timeout=config.remote_timeout,
                          retry_interval=config.remote_retry_interval, log=logger)
        return cls(config.mooncake_master, gate, metadata_server=config.mooncake_metadata_server,
                   local_hostname=config.mooncake_local_hostname, protocol=config.mooncake_protocol,
                   rdma_devices=config.mooncake_rdma_devices,
                   global_segment_size=config.mooncake_global_segment_size,
                   local_buffer_size=config.mooncake_local_buffer_size, key_prefix=config.remote_key_prefix)

    # ---- Tier primitives -------------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        try:
            return self._call("lookup", key, lambda c: c.is_exist(self.object_name(key))) == 1
        except RemoteUnavailable:
            return False

    def _object_size(self, key: str) -> int | None:
        try:
            nbytes = self._call("size", key, lambda c: c.get_size(self.object_name(key)), ok=(OBJECT_NOT_FOUND,))
        except RemoteUnavailable:
            return None
        return None if nbytes == OBJECT_NOT_FOUND else nbytes

    def _object_bytes(self, key: str) -> bytes:
        try:
            blob = self._call("get", key, lambda c: c.get(self.object_name(key)))
        except RemoteUnavailable as exc:
            raise BlockMissing(str(exc)) from None
        if not blob:
            raise BlockMissing(key)
        return blob

    def _put_object(self, key: str, header: bytes, payload: memoryview) -> bool:
        code = self._call("put", key, lambda c: c.put_parts(self.object_name(key), header, payload),
                          ok=(OBJECT_ALREADY_EXISTS, *PUT_REFUSALS))
        if code in PUT_REFUSALS:
            raise OSError(f"Mooncake put of block {key} failed: {PUT_REFUSALS[code]}")
        return code == 0

    def remove(self, key: str) -> None:
        try:
            self._call("remove", key, lambda c: c.remove(self.object_name(key), True), ok=(OBJECT_NOT_FOUND,))
        except RemoteUnavailable:
            return

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                self._workers.submit(client.close).result(timeout=self.gate.timeout)
            except FutureTimeout:
                logger.warning("Mooncake tier: client close still running after %.1f s; left to finish",
                               self.gate.timeout)
        self._workers.shutdown(wait=False)

    def object_name(self, key: str) -> str:
        """The Mooncake key of block ``key``."""
        return f"{self.key_prefix}{key}"

    def _where(self, key: str) -> str:
        """How errors name block ``key``'s object."""
        return f"Mooncake object {self.object_name(key)}"

    # ---- calls -----------------------------------------------------------------------------------------------
    def _call(self, what: str, key: str, request, ok: tuple[int, ...] = ()):
        """``request(client)`` on a worker thread, waited for at most ``remote_timeout``; a negative status code
        not in ``ok``, a timeout or a failed setup becomes RemoteUnavailable (and marks the master down)."""
        with self.gate.request(f"{what} of block {key}"):
            client = self._connected()
            try:
                result = self._workers.submit(request, client).result(timeout=self.gate.timeout)
            except FutureTimeout:
                raise self.gate.failed(f"{what} of block {key}", f"no answer within {self.gate.timeout} s") from None
        if isinstance(result, int) and result < 0 and result not in ok:
            raise self.gate.failed(f"{what} of block {key}", f"Mooncake status {result}")
        self.gate.succeeded()
        return result

    def _connected(self) -> MooncakeDistributedStore:
        """The set-up client, setting one up first if there is none; RemoteUnavailable if that fails or is slow."""
        with self._lock:
            if self._client is not None:
                return self._client
            if self._connecting is None:
                self._connecting = self._workers.submit(self._setup)
            connecting = self._connecting
        try:
            client = connecting.result(timeout=self.gate.timeout)
        except FutureTimeout:
            raise self.gate.failed("setup", f"the client is not set up after {self.gate.timeout} s") from None
        except RemoteUnavailable as exc:
            with self._lock:
                if self._connecting is connecting:
                    self._connecting = None
            raise self.gate.failed("setup", str(exc)) from None
        with self._lock:
            self._client, self._connecting = client, None
        return client

    def _setup(self) -> MooncakeDistributedStore:
        try:
            socket.create_connection(self.master_address, timeout=self.gate.timeout).close()
        except OSError as exc:
            raise RemoteUnavailable(f"master {self.master} unreachable: {exc.strerror or exc}") from None
        local_hostname, *rest = self._setup_args
        client = MooncakeDistributedStore()
        code = client.setup(local_hostname or _route_address(self.master_address), *rest)
        if code != 0:
            client.close()
            raise RemoteUnavailable(f"setup against master {self.master} returned status {code}")
        return client


def _route_address(master: tuple[str, int]) -> str:
    """This host's address on the route to the master (what other nodes can reach it at)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(master)
        return probe.getsockname()[0]
