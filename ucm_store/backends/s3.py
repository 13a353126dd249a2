"""DS3FS tier: blocks as objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, an S3 gateway over 3FS, ...).

Client: obstore (Rust ``object_store``), chosen by measurement against boto3 on one moto server in one run
(``bench/bench_remote_tiers.py``: 32 objects of 2 MiB one at a time, 2-core machine, in
``bench/results/remote_tiers-*.json``), two runs: put 0.16-0.19 vs 0.12-0.15 GB/s, get 0.40-0.46 vs 0.28-0.36 GB/s,
and about half the client CPU (put 0.9-1.0 vs 2.1-2.4 s per GB, get 0.7-1.0 vs 1.3-1.8 s per GB). That CPU is what
the serving process pays, and obstore releases the GIL for the whole request (checked: other threads run while a
request waits), so the pipeline's I/O threads overlap their transfers.

Layout: block ``key`` is the object ``{remote_key_prefix}{key[0:2]}/{key}`` (256 prefixes spread the request rate,
which S3 limits per prefix). The object is a framed block (:mod:`ucm_store.backends.framing`: the 64-byte header with
magic, lengths, CRC32 and key digest, then the payload), so a truncated, corrupt or misplaced object fails its read and
is deleted, never returned.

Visibility: an object is uploaded under its final name only once the whole block is in memory; a single PUT is atomic
and a multipart upload (objects of ``multipart_threshold`` bytes or more, in ``multipart_chunk_size`` parts, up to
``max_concurrent_requests`` parts at once) becomes visible only when completed, so readers see a whole block or none.

Failures: every request is bounded by ``remote_timeout`` (the client's request timeout; retries stop after it too).
A failed request marks the server down for ``remote_retry_interval`` seconds (one warning per outage); meanwhile the
tier answers at once: ``contains`` False, ``size`` None, ``read`` BlockMissing, ``put``
:class:`~ucm_store.backends.remote.RemoteUnavailable` (an OSError the pipeline logs with the block id). Connections
are opened lazily, so a restarted server serves again. At most ``max_concurrent_requests`` operations run at once;
``connection_pool_size`` idle connections are kept. ``use_io_uring`` is accepted and ignored (this is HTTP; io_uring
does not apply), noted once at info level.

Credentials: from the config, else the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``; instance credentials where no keys are set). They are
never logged: messages carry the operation, the block key and the client's first error line with secrets masked.
"""
import functools
import logging
import os
import threading
from collections import OrderedDict
from datetime import timedelta

from ucm_store.backends.base import BlockMissing
from ucm_store.backends.objects import FramedObjectTier
from ucm_store.backends.remote import RemoteGate, RemoteUnavailable
from ucm_store.config import S3Settings

try:
    import obstore
    from obstore.exceptions import BaseError as ObstoreError
    from obstore.store import S3Store
except ImportError as exc:
    raise ImportError(f"the DS3FS tier needs the 'obstore' package (pip install obstore): {exc}") from exc

logger = logging.getLogger(__name__)
SIZE_CACHE_ENTRIES = 4096


class S3Tier(FramedObjectTier):
    """Committed blocks as objects in one S3 bucket, shared by every node that names the same bucket and prefix."""

    name = "DS3FS"
    durable = True

    def __init__(self, store: S3Store, bucket: str, gate: RemoteGate, *, key_prefix: str = "ucm/",
                 multipart_threshold: int = 8 << 20, multipart_chunk_size: int = 8 << 20, part_concurrency: int = 8,
                 secrets: tuple[str, ...] = ()):
        self.store = store
        self.bucket = bucket
        self.gate = gate
        self.key_prefix = key_prefix
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.part_concurrency = part_concurrency
        self._secrets = tuple(s for s in secrets if s)
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, config: S3Settings) -> "S3Tier":
        """The tier its slice of the store config describes (bucket, endpoint and credentials from it or the AWS
        environment)."""
        bucket = config.s3_bucket or os.environ.get("AWS_BUCKET_NAME") or os.environ.get("AWS_BUCKET")
        if not bucket:
            raise ValueError("s3_bucket: the DS3FS tier needs a bucket; none given in the config, $AWS_BUCKET_NAME "
                             "or $AWS_BUCKET")
        if config.use_io_uring:
            _note_io_uring_ignored()
        given = {"endpoint": config.s3_endpoint, "region": config.s3_region,
                 "access_key_id": config.s3_access_key_id, "secret_access_key": config.s3_secret_access_key,
                 "session_token": config.s3_session_token}
        endpoint = config.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
        timeout = f"{config.remote_timeout}s"
        client = {"timeout": timeout, "connect_timeout": timeout, "allow_http": endpoint.startswith("http://"),
                  "pool_max_idle_per_host": str(config.connection_pool_size)}
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=config.remote_timeout),
                 "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=1)}}
        store = S3Store(bucket, config={k: v for k, v in given.items() if v}, client_options=client,
                        retry_config=retry)
        gate = RemoteGate(cls.name, max_concurrent=config.max_concurrent_requests, timeout=config.remote_timeout,
                          retry_interval=config.remote_retry_interval, log=logger)
        secrets = (config.s3_secret_access_key, config.s3_session_token, os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                   os.environ.get("AWS_SESSION_TOKEN", ""))
        return cls(store, bucket, gate, key_prefix=config.remote_key_prefix,
                   multipart_threshold=config.multipart_threshold, multipart_chunk_size=config.multipart_chunk_size,
                   part_concurrency=config.max_concurrent_requests, secrets=secrets)

    # ---- Tier primitives -------------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        try:
            self._head(key)
        except (FileNotFoundError, RemoteUnavailable):
            return False
        return True

    def _object_size(self, key: str) -> int | None:
        with self._lock:
            nbytes = self._sizes.get(key)
        if nbytes is None:
            try:
                nbytes = self._head(key)
            except (FileNotFoundError, RemoteUnavailable):
                return None
        return nbytes

    def _object_bytes(self, key: str) -> bytes:
        try:
            return self._call("get", key, lambda: obstore.get(self.store, self.object_name(key)).bytes())
        except FileNotFoundError:
            self._forget(key)
            raise BlockMissing(key) from None
        except RemoteUnavailable as exc:
            raise BlockMissing(str(exc)) from None

    def _put_object(self, key: str, header: bytes, payload: memoryview) -> bool:
        nbytes = len(header) + len(payload)
        name = self.object_name(key)
        if nbytes >= self.multipart_threshold:
            parts = -(-nbytes // self.multipart_chunk_size)
            self._call("put", key, lambda: obstore.put(
                self.store, name, [header, payload], use_multipart=True, chunk_size=self.multipart_chunk_size,
                max_concurrency=min(parts, self.part_concurrency)))
        else:
            blob = header + payload
            self._call("put", key, lambda: obstore.put(self.store, name, blob, use_multipart=False))
        self._remember(key, nbytes)
        return True

    def remove(self, key: str) -> None:
        self._forget(key)
        try:
            self._call("delete", key, lambda: obstore.delete(self.store, self.object_name(key)))
        except (FileNotFoundError, RemoteUnavailable):
            return

    def object_name(self, key: str) -> str:
        """The object name of block ``key`` in the bucket."""
        return f"{self.key_prefix}{key[0:2]}/{key}"

    # ---- requests --------------------------------------------------------------------------------------------
    def _head(self, key: str) -> int:
        """Object bytes of block ``key`` (remembered for :meth:`size`); FileNotFoundError / RemoteUnavailable."""
        try:
            meta = self._call("head", key, lambda: obstore.head(self.store, self.object_name(key)))
        except FileNotFoundError:
            self._forget(key)
            raise
        self._remember(key, meta["size"])
        return meta["size"]

    def _call(self, what: str, key: str, request):
        """Run ``request()`` under the gate; FileNotFoundError passes (an answer), any other client error becomes
        RemoteUnavailable with a one-line, secret-free cause."""
        with self.gate.request(f"{what} of block {key}"):
            try:
                result = request()
            except FileNotFoundError:
                self.gate.succeeded()
                raise
            except (ObstoreError, OSError) as exc:
                raise self.gate.failed(f"{what} of block {key}", self._cause(exc)) from None
        self.gate.succeeded()
        return result

    def _cause(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _where(self, key: str) -> str:
        """How errors name block ``key``'s object."""
        return f"object {self.bucket}/{self.object_name(key)}"

    def _remember(self, key: str, nbytes: int) -> None:
        with self._lock:
            self._sizes[key] = nbytes
            self._sizes.move_to_end(key)
            while len(self._sizes) > SIZE_CACHE_ENTRIES:
                self._sizes.popitem(last=False)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._sizes.pop(key, None)


@functools.cache
def _note_io_uring_ignored() -> None:
    logger.info("use_io_uring is accepted and ignored by the DS3FS tier: it talks HTTP, where io_uring does not apply")
