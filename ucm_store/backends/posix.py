"""Posix tier: one file per block under ``storage_backends``, published by fsync + atomic rename.

Layout under each root: ``blocks/<k[0:2]>/<k[2:4]>/<key>.blk`` and ``tmp/`` for files being written (the same
file system, so the rename is atomic). A block file is a header (magic, header length, payload length, CRC32 of
the payload, the key) followed by the payload. A reader checks all of it, so a truncated, corrupt or misplaced
file fails the read and is removed, never returned. A writer that dies leaves only a temp file, invisible to
readers and swept after ``STALE_TMP_SECONDS``. No file locks: concurrent writers of one key each rename a
complete file into place, and both hold the same bytes (committed blocks are immutable).

With ``use_direct_io`` files are written and read with O_DIRECT through 4 KiB-aligned bounce buffers from the
pinned pool (header padded to 4 KiB, payload padded to 4 KiB). ``storage_capacity`` bounds the bytes this
process keeps under the roots: the least recently used files (by this process's view, seeded from file mtimes
at start) are deleted past it.
"""
import errno
import itertools
import os
import socket
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

from ucm_store.backends.base import BlockCorrupt, BlockMissing, Tier
from ucm_store.pool import PinnedMemoryPool

MAGIC = b"UCMBLK01"
_HEADER = struct.Struct("<8sIIQI16s")  # magic, header_len, flags, payload_len, crc32, key digest
SMALL_HEADER = 64
ALIGN = 4096
STALE_TMP_SECONDS = 3600.0
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class PosixTier(Tier):
    """Block files on local (or mounted) file systems, spread over one or more roots."""

    name = "Posix"
    durable = True

    def __init__(self, roots: tuple[str, ...], *, path_strategy: str = "round_robin", use_direct_io: bool = False,
                 capacity_bytes: int = 0, pool: PinnedMemoryPool | None = None):
        if not roots:
            raise ValueError(f"storage_backends: the {self.name} tier needs at least one directory, got none")
        self.roots = tuple(Path(r) for r in roots)
        self.path_strategy = path_strategy
        self.direct = use_direct_io
        self.capacity = capacity_bytes
        self.pool = pool or PinnedMemoryPool.get_instance()
        self._next_root = itertools.count()
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._tmp_tag = f"{socket.gethostname()}.{os.getpid()}"
        for root in self.roots:
            self._prepare_root(root)
        self._load_index()

    # ---- Tier primitives -------------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        return self._find(key) is not None

    def size(self, key: str) -> int | None:
        path = self._find(key)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                header = self._parse_header(key, path, f.read(_HEADER.size))
        except FileNotFoundError:
            return None
        except BlockCorrupt:
            self.remove(key)
            raise
        return header[1]

    def read(self, key: str, dst: torch.Tensor) -> None:
        path = self._find(key)
        if path is None:
            raise BlockMissing(key)
        try:
            if self.direct:
                self._read_direct(key, path, dst)
            else:
                self._read_buffered(key, path, dst)
        except FileNotFoundError as exc:
            raise BlockMissing(key) from exc
        except BlockCorrupt:
            self.remove(key)
            raise
        self._touch(key, path)

    def put(self, key: str, src: torch.Tensor) -> bool:
        if self.contains(key):
            return False
        final = self._place(key)
        tmp = final.parents[3] / "tmp" / f"{key}.{self._tmp_tag}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self._write_file(key, tmp, src)
            final.parent.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._account(key, final.stat().st_size)
        return True

    def remove(self, key: str) -> None:
        for root in self.roots:
            self._block_path(root, key).unlink(missing_ok=True)
        with self._lock:
            self._bytes -= self._lru.pop(key, 0)

    @property
    def used_bytes(self) -> int:
        """File bytes of the blocks this process knows under its roots."""
        return self._bytes

    # ---- paths -----------------------------------------------------------------------------------------------
    @staticmethod
    def _block_path(root: Path, key: str) -> Path:
        return root / "blocks" / key[0:2] / key[2:4] / f"{key}.blk"

    def _place(self, key: str) -> Path:
        if self.path_strategy == "hash":
            root = self.roots[int(key[:8], 16) % len(self.roots)]
        else:
            root = self.roots[next(self._next_root) % len(self.roots)]
        return self._block_path(root, key)

    def _find(self, key: str) -> Path | None:
        for root in self._search_order(key):
            path = self._block_path(root, key)
            if path.exists():
                return path
        return None

    def _search_order(self, key: str) -> tuple[Path, ...]:
        if self.path_strategy == "hash" or len(self.roots) == 1:
            first = int(key[:8], 16) % len(self.roots)
            return self.roots[first:] + self.roots[:first]
        return self.roots

    # ---- file format -----------------------------------------------------------------------------------------
    def _header(self, key: str, payload: memoryview) -> bytes:
        header_len = ALIGN if self.direct else SMALL_HEADER
        packed = _HEADER.pack(MAGIC, header_len, 0, len(payload), zlib.crc32(payload), bytes.fromhex(key)[:16])
        return packed.ljust(header_len, b"\0")

    def _parse_header(self, key: str, path: Path, raw: bytes) -> tuple[int, int, int]:
        """(header_len, payload_len, crc32) of a block file; BlockCorrupt if the header is not ours for ``key``."""
        if len(raw) < _HEADER.size:
            raise BlockCorrupt(f"block file {path} is truncated: {len(raw)}-byte header")
        magic, header_len, _, payload_len, crc, digest = _HEADER.unpack_from(raw)
        if magic != MAGIC or digest != bytes.fromhex(key)[:16] or header_len not in (SMALL_HEADER, ALIGN):
            raise BlockCorrupt(f"block file {path} has a bad header (not a UCM block for key {key})")
        return header_len, payload_len, crc

    def _write_file(self, key: str, tmp: Path, src: torch.Tensor) -> None:
        payload = memoryview(src.numpy())
        header = self._header(key, payload)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else 0)
        fd = os.open(tmp, flags, _FILE_MODE)
        try:
            if self.direct:
                self._write_direct(fd, header, src)
            else:
                _write_all(fd, [header, payload])
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_direct(self, fd: int, header: bytes, src: torch.Tensor) -> None:
        total = len(header) + _round_up(src.numel())
        bounce = self.pool.allocate(total)
        try:
            bounce[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
            bounce[len(header):len(header) + src.numel()].copy_(src)
            bounce[len(header) + src.numel():].zero_()
            _write_all(fd, [memoryview(bounce.numpy())])
        finally:
            self.pool.release(bounce)

    def _read_buffered(self, key: str, path: Path, dst: torch.Tensor) -> None:
        with open(path, "rb", buffering=0) as f:
            header_len, payload_len, crc = self._parse_header(key, path, f.read(SMALL_HEADER))
            self._check_length(path, payload_len, dst)
            f.seek(header_len)
            view = memoryview(dst.numpy())
            got = f.readinto(view)
            if got != payload_len:
                raise BlockCorrupt(f"block file {path} is truncated: {got} of {payload_len} payload bytes")
        _check_crc(path, view, crc)

    def _read_direct(self, key: str, path: Path, dst: torch.Tensor) -> None:
        size = os.stat(path).st_size
        bounce = self.pool.allocate(_round_up(max(size, ALIGN)))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                got = os.preadv(fd, [memoryview(bounce.numpy())], 0)
            finally:
                os.close(fd)
            header_len, payload_len, crc = self._parse_header(key, path, bytes(bounce[:_HEADER.size].numpy()))
            self._check_length(path, payload_len, dst)
            if got < header_len + payload_len:
                raise BlockCorrupt(f"block file {path} is truncated: {got - header_len} of {payload_len} bytes")
            dst.copy_(bounce[header_len:header_len + payload_len])
        finally:
            self.pool.release(bounce)
        _check_crc(path, memoryview(dst.numpy()), crc)

    @staticmethod
    def _check_length(path: Path, payload_len: int, dst: torch.Tensor) -> None:
        if payload_len != dst.numel():
            raise BlockCorrupt(f"block file {path} holds {payload_len} bytes, {dst.numel()} expected")

    # ---- capacity and start-up -------------------------------------------------------------------------------
    def _prepare_root(self, root: Path) -> None:
        try:
            for sub in ("blocks", "tmp"):
                (root / sub).mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            probe = root / "tmp" / f".probe.{self._tmp_tag}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"storage_backends: {str(root)!r} is not a writable directory for the {self.name} tier: "
                             f"{exc.strerror or exc}") from exc
        self._sweep_stale_tmp(root / "tmp")

    @staticmethod
    def _sweep_stale_tmp(tmp_dir: Path) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in os.scandir(tmp_dir):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue

    def _load_index(self) -> None:
        found = []
        for root in self.roots:
            for path in (root / "blocks").glob("*/*/*.blk"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                found.append((stat.st_mtime, path.stem, stat.st_size))
        for _, key, size in sorted(found):
            self._lru[key] = size
            self._bytes += size

    def _touch(self, key: str, path: Path) -> None:
        """Mark ``key`` most recently used, here and (by mtime) for processes that start later."""
        try:
            os.utime(path)
            nbytes = path.stat().st_size
        except OSError:
            return
        with self._lock:
            if key not in self._lru:
                self._bytes += nbytes
            self._lru[key] = nbytes
            self._lru.move_to_end(key)

    def _account(self, key: str, nbytes: int) -> None:
        with self._lock:
            self._bytes += nbytes - self._lru.pop(key, 0)
            self._lru[key] = nbytes
            victims = []
            while self.capacity and self._bytes > self.capacity and len(self._lru) > 1:
                victim, size = self._lru.popitem(last=False)
                self._bytes -= size
                victims.append(victim)
        for victim in victims:
            for root in self.roots:
                self._block_path(root, victim).unlink(missing_ok=True)


class NFSTier(PosixTier):
    """The Posix tier over NFS mounts: the same files; safe for several hosts writing one directory, since
    publication is an atomic rename of a complete, uniquely named (host, pid, random) temp file."""

    name = "NFS"


def _write_all(fd: int, buffers: list) -> None:
    """writev until every byte of ``buffers`` is written (short writes resumed); ENOSPC surfaces as OSError."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        written = os.writev(fd, views)
        if written == 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _check_crc(path: Path, payload: memoryview, crc: int) -> None:
    if zlib.crc32(payload) != crc:
        raise BlockCorrupt(f"block file {path} failed its CRC32 check (corrupt payload)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
