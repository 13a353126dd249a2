"""Posix tier: one file per block under ``storage_backends``, published by fsync + atomic rename.

Layout under each root: ``blocks/<k[0:2]>/<key>.blk`` and ``tmp/`` for files being written (the same file system, so
the rename is atomic). The 256 ``blocks/<k[0:2]>`` directories are made when the tier opens a root, so a write never
creates a directory (a second level of 65,536 directories made each new store's first writes create one or two
directories per block: ~0.5 ms of CPU per 128 KiB block file instead of ~0.33). A block file is a framed block
(:mod:`ucm_store.backends.framing`: header with magic, lengths, CRC32 of the payload and key digest, then the
payload). A reader checks all of it, so a truncated, corrupt or misplaced file fails the read and is removed, never
returned. A writer that dies leaves only a temp file, invisible to readers and swept after ``STALE_TMP_SECONDS``. No
file locks: concurrent writers of one key each rename a complete file into place, and both hold the same bytes
(committed blocks are immutable). With several roots two writers may place one key in different roots; each writer
then keeps only the copy in the first root (the one readers try first), so one copy remains. Directories and files
are created owner-only (0700 / 0600).

Write-downs come in batches (:meth:`PosixTier.put_many`): all temp files written, one ``syncfs`` per file system,
all renames, one more ``syncfs``; the same order (a block's bytes are durable before its name) for half the CPU of a
file and a directory ``fsync`` per block. ``syncfs`` also flushes whatever else is dirty on that file system, so a
root shared with heavy unrelated writers makes write-downs wait for them (commits into a Posix top tier keep the
per-block fsyncs).

With ``use_direct_io`` files are written and read with O_DIRECT (the 4 KiB header, payload padded to 4 KiB)
through a 4 KiB-aligned bounce buffer per thread, in plain host memory outside the pinned pool: a transfer that
already holds a pool buffer never waits for a second one, so a full pool cannot stall disk I/O (with bounces from
the pool, concurrent promotions each holding their destination could starve one another until ``alloc_timeout``).
Each I/O thread keeps one bounce, grown to the largest block file it has moved.
``storage_capacity`` bounds the bytes this process keeps under the roots: the least recently used files (by this
process's view, seeded from file mtimes at start) are deleted past it.
"""
import ctypes
import errno
import itertools
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch

from ucm_store.backends import framing
from ucm_store.backends.base import BlockMissing, Tier

ALIGN = framing.ALIGNED_HEADER  # O_DIRECT alignment of offsets and lengths; the aligned header keeps the payload on it
STALE_TMP_SECONDS = 3600.0
_FILE_MODE = 0o600
_DIR_MODE = 0o700


class PosixTier(Tier):
    """Block files on local (or mounted) file systems, spread over one or more roots."""

    name = "Posix"
    durable = True

    def __init__(self, roots: tuple[str, ...], *, path_strategy: str = "round_robin", use_direct_io: bool = False,
                 capacity_bytes: int = 0):
        if not roots:
            raise ValueError(f"storage_backends: the {self.name} tier needs at least one directory, got none")
        self.roots = tuple(Path(r) for r in roots)
        self.path_strategy = path_strategy
        self.direct = use_direct_io
        self.capacity = capacity_bytes
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
        for path in self._copies(key):
            try:
                with self._drop_if_corrupt(key), open(path, "rb") as f:
                    return framing.parse_header(key, _where(path), f.read(framing.HEADER.size))[1]
            except FileNotFoundError:
                continue
        return None

    def read(self, key: str, dst: torch.Tensor) -> None:
        for path in self._copies(key):
            try:
                with self._drop_if_corrupt(key):
                    if self.direct:
                        self._read_direct(key, path, dst)
                    else:
                        self._read_buffered(key, path, dst)
            except FileNotFoundError:
                continue
            self._touch(key, path)
            return
        raise BlockMissing(key)

    def put(self, key: str, src: torch.Tensor) -> bool:
        if self.contains(key):
            return False
        tmp, final = self._new_paths(key)
        try:
            self._write_file(key, tmp, src)
            _rename_into_place(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        if len(self.roots) > 1 and not self._keep_first_copy(key, final):
            return True
        self._account(key, os.stat(final).st_size)
        return True

    def put_many(self, items: list[tuple[str, torch.Tensor]]) -> list[Exception | None]:
        """Publish several blocks with one durability round: every temp file written, one ``syncfs`` per file
        system, every rename, one more ``syncfs``. Each block is as durable as :meth:`put` leaves it (its bytes
        before its name) for about a third of the CPU of a file and a directory fsync per block. Per item None
        (published, or already there) or the exception that cost that block alone."""
        if len(items) < 2 or _SYNCFS is None:
            return super().put_many(items)
        results: list[Exception | None] = [None] * len(items)
        written = []  # (item index, key, temp path, final path)
        for i, (key, src) in enumerate(items):
            if self.contains(key):
                continue
            tmp, final = self._new_paths(key)
            try:
                self._write_file(key, tmp, src, durable=False)
                written.append((i, key, tmp, final))
            except Exception as exc:
                _remove(tmp)
                results[i] = exc
        if not written:
            return results
        try:
            self._sync_roots()
            for i, _, tmp, final in written:
                _rename_into_place(tmp, final, durable=False)
            self._sync_roots()
        except Exception as exc:  # renamed files are complete (synced first); the others are dropped
            for i, _, tmp, _ in written:
                _remove(tmp)
                results[i] = exc
            return results
        for i, key, _, final in written:
            if len(self.roots) == 1 or self._keep_first_copy(key, final):
                self._account(key, os.stat(final).st_size)
        return results

    def remove(self, key: str) -> None:
        self._unlink(key)
        with self._lock:
            self._bytes -= self._lru.pop(key, 0)

    @property
    def used_bytes(self) -> int:
        """File bytes of the blocks this process knows under its roots."""
        return self._bytes

    # ---- paths -----------------------------------------------------------------------------------------------
    @staticmethod
    def _block_path(root: Path, key: str) -> Path:
        return Path(root, _relative_path(key))

    def _new_paths(self, key: str) -> tuple[str, str]:
        """(temp file, final file) of a new copy of ``key``, in the root :meth:`_place` picks. str paths: a
        write-down's path handling costs a third of the CPU it did through Path."""
        root = self._place(key)
        tmp = os.path.join(root, "tmp", f"{key}.{self._tmp_tag}.{uuid.uuid4().hex[:8]}.tmp")
        return tmp, os.path.join(root, _relative_path(key))

    def _place(self, key: str) -> str:
        """The root a new copy of ``key`` goes to."""
        if self.path_strategy == "hash":
            return str(self.roots[int(key[:8], 16) % len(self.roots)])
        return str(self.roots[next(self._next_root) % len(self.roots)])

    def _find(self, key: str) -> Path | None:
        relative = _relative_path(key)  # str paths: a lookup's stat is 10x cheaper than through Path
        for root in self._search_order(key):
            path = os.path.join(root, relative)
            if os.path.exists(path):
                return Path(path)
        return None

    def _copies(self, key: str):
        """Block ``key``'s file, found again (at most twice) if it vanishes before it is opened: a copy another
        writer dropped as a duplicate, or a file evicted and written anew."""
        for _ in range(2):
            path = self._find(key)
            if path is None:
                return
            yield path

    def _keep_first_copy(self, key: str, mine: str) -> bool:
        """After publishing ``mine``, converge on one copy of ``key`` without ever losing the block: if a copy
        stands in a root readers search earlier, drop ``mine``; else drop the copies in later roots. The earliest
        existing copy is never deleted by anyone, so one copy always remains. True if ``mine`` stays."""
        paths = [os.path.join(root, _relative_path(key)) for root in self._search_order(key)]
        position = paths.index(mine)
        if any(os.path.exists(path) for path in paths[:position]):
            _remove(mine)
            return False
        for path in paths[position + 1:]:
            _remove(path)
        return True

    def _search_order(self, key: str) -> tuple[Path, ...]:
        if self.path_strategy == "hash" or len(self.roots) == 1:
            first = int(key[:8], 16) % len(self.roots)
            return self.roots[first:] + self.roots[:first]
        return self.roots

    def _sync_roots(self) -> None:
        """:func:`_syncfs` once per file system among the roots."""
        seen = set()
        for root in self.roots:
            device = os.stat(root).st_dev
            if device not in seen:
                seen.add(device)
                _syncfs(str(root))

    def _unlink(self, key: str) -> None:
        """Delete block ``key``'s file from whichever root holds it."""
        for root in self.roots:
            self._block_path(root, key).unlink(missing_ok=True)

    # ---- file I/O --------------------------------------------------------------------------------------------
    def _write_file(self, key: str, tmp: str, src: torch.Tensor, durable: bool = True) -> None:
        """Write the framed block to the new file ``tmp`` and fsync it (``durable=False``: the caller syncs)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if self.direct else 0)
        fd = os.open(tmp, flags, _FILE_MODE)
        try:
            self._write_framed(fd, key, src)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _write_framed(self, fd: int, key: str, src: torch.Tensor) -> None:
        """Header and payload of block ``key`` into the open file ``fd`` (the 4 KiB header with O_DIRECT)."""
        payload = memoryview(src.numpy())
        header = framing.pack_header(key, payload, framing.ALIGNED_HEADER if self.direct else framing.SMALL_HEADER)
        if self.direct:
            self._write_direct(fd, header, src)
        else:
            _write_all(fd, [header, payload])

    @staticmethod
    def _write_direct(fd: int, header: bytes, src: torch.Tensor) -> None:
        """One aligned write of header, payload and zero padding through this thread's bounce buffer."""
        bounce = _bounce(len(header) + _round_up(src.numel()))
        bounce[:len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        bounce[len(header):len(header) + src.numel()].copy_(src)
        bounce[len(header) + src.numel():].zero_()
        _write_all(fd, [memoryview(bounce.numpy())])

    def _read_buffered(self, key: str, path: Path, dst: torch.Tensor) -> None:
        """Verify the block file ``path`` and read its payload straight into ``dst``."""
        where, view = _where(path), memoryview(dst.numpy())
        with open(path, "rb", buffering=0) as f:
            header_len, payload_len, crc = framing.parse_header(key, where, f.read(framing.HEADER.size))
            framing.check_length(where, payload_len, dst.numel())
            f.seek(header_len)
            framing.check_complete(where, f.readinto(view), payload_len)
        framing.check_crc(where, view, crc)

    def _read_direct(self, key: str, path: Path, dst: torch.Tensor) -> None:
        """Read the whole block file ``path`` with O_DIRECT into this thread's bounce buffer, verify it, copy to
        ``dst``."""
        where, size = _where(path), os.stat(path).st_size
        bounce = _bounce(_round_up(max(size, ALIGN)))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            got = os.preadv(fd, [memoryview(bounce.numpy())], 0)
        finally:
            os.close(fd)
        raw = bytes(bounce[:min(got, framing.HEADER.size)].numpy())
        header_len, payload_len, crc = framing.parse_header(key, where, raw)
        framing.check_length(where, payload_len, dst.numel())
        framing.check_complete(where, max(got - header_len, 0), payload_len)
        dst.copy_(bounce[header_len:header_len + payload_len])
        framing.check_crc(where, memoryview(dst.numpy()), crc)

    # ---- capacity and start-up -------------------------------------------------------------------------------
    def _prepare_root(self, root: Path) -> None:
        try:
            for sub in ("blocks", "tmp"):
                _make_dirs(root / sub)
            _make_fan_out(root / "blocks")
            probe = root / "tmp" / f".probe.{self._tmp_tag}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE))
            probe.unlink()
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            raise ValueError(f"storage_backends: {str(root)!r} is not a writable directory for the {self.name} tier: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
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
            for path in block_files(root):
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
            self._unlink(victim)


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


def _where(path: Path) -> str:
    """How errors name a block file."""
    return f"block file {path}"


def _make_dirs(path: Path) -> None:
    """Create directory ``path`` and its missing parents, each owner-only (``mkdir(parents=True)`` would give the
    parents the umask's mode)."""
    if path.is_dir() or path.parent == path:
        return
    _make_dirs(path.parent)
    try:
        path.mkdir(mode=_DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None


def _make_fan_out(blocks: Path) -> None:
    """The 256 directories ``blocks/00`` .. ``blocks/ff`` (owner-only), those missing."""
    present = set(os.listdir(blocks))
    for prefix in (f"{i:02x}" for i in range(256)):
        if prefix not in present:
            _make_dirs(blocks / prefix)


def _rename_into_place(tmp: str, final: str, durable: bool = True) -> None:
    """Rename ``tmp`` to ``final`` and fsync final's directory (``durable=False``: the caller syncs), creating it
    (owner-only) when the rename finds it missing (someone removed it)."""
    directory = os.path.dirname(final)
    try:
        os.rename(tmp, final)
    except FileNotFoundError:
        _make_dirs(Path(directory))
        os.rename(tmp, final)
    if durable:
        _fsync_dir(directory)


def _load_syncfs():
    """libc's ``syncfs(fd)`` (Linux), or None where there is none."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes, syncfs.restype = [ctypes.c_int], ctypes.c_int
    return syncfs


_SYNCFS = _load_syncfs()


def _syncfs(path: str) -> None:
    """Flush everything written to the file system holding ``path`` to stable storage (data and metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", path)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    """Delete file ``path`` if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_bounces = threading.local()


def _bounce(nbytes: int) -> torch.Tensor:
    """The calling thread's O_DIRECT bounce buffer: ``nbytes`` (a multiple of ALIGN) uint8 bytes at a 4 KiB-aligned
    address; reused by the thread's next transfer, reallocated only when a larger block file comes. A normal tensor
    even when first taken under inference mode, so that later transfers outside it may write to it."""
    held = getattr(_bounces, "buf", None)
    if held is None or held.numel() < nbytes:
        with torch.inference_mode(False):
            raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
        start = -raw.data_ptr() % ALIGN
        held = _bounces.buf = raw[start:start + nbytes]
    return held[:nbytes]


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def block_files(root: str | Path) -> list[Path]:
    """The block files under a Posix / NFS tier's root (files being written are not among them)."""
    return sorted(Path(root, "blocks").glob("*/*.blk"))


def _relative_path(key: str) -> str:
    """Where block ``key``'s file lies under a root: ``blocks/<2 hex>/<key>.blk``."""
    return os.path.join("blocks", key[0:2], f"{key}.blk")
