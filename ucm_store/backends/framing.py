"""Block framing: the bytes every tier stores for one block, and the checks a reader makes on them.

A framed block is a header followed by the payload (the block's bytes, unchanged). The header, little-endian
(:data:`HEADER` packs its first 44 bytes):

=======  =====  ===========================================================================================
offset   bytes  field
=======  =====  ===========================================================================================
0        8      magic ``b"UCMBLK01"``
8        4      header length: the payload's offset, :data:`SMALL_HEADER` (64) or :data:`ALIGNED_HEADER` (4096)
12       4      flags, 0 (reserved)
16       8      payload length in bytes
24       4      CRC32 (``zlib.crc32``) of the payload
28       16     key digest: the block key's first 16 bytes (the key is 32 hex digits, so all of it)
44       ...    zeros up to the header length
=======  =====  ===========================================================================================

Posix files use the 64-byte header, or with O_DIRECT the 4096-byte one, and then also zero-pad the payload to a
multiple of 4096 bytes (so a file may be longer than header + payload). Objects (DS3FS, Mooncake) are exactly a
64-byte header and the payload. A reader checks the magic, header length, key digest, payload length and CRC32, so a
truncated, corrupt or misplaced block raises :class:`BlockCorrupt` naming where it lies, and is never returned.

Primitives: :func:`pack_header`, :func:`parse_header`, :func:`check_length`, :func:`check_complete`,
:func:`check_crc`; for objects :func:`frame`, :func:`unframe_into` and :func:`object_payload_len`.
"""
import struct
import zlib

import torch

from ucm_store.backends.base import BlockCorrupt

MAGIC = b"UCMBLK01"
HEADER = struct.Struct("<8sIIQI16s")  # magic, header_len, flags, payload_len, crc32, key digest
SMALL_HEADER = 64
ALIGNED_HEADER = 4096  # one O_DIRECT alignment unit, so the payload that follows stays aligned
HEADER_LENS = (SMALL_HEADER, ALIGNED_HEADER)


def key_digest(key: str) -> bytes:
    """The 16 bytes a header stores to name its block: the first 16 bytes of the hex ``key``."""
    return bytes.fromhex(key)[:16]


def pack_header(key: str, payload: memoryview, header_len: int = SMALL_HEADER) -> bytes:
    """The ``header_len``-byte header (one of :data:`HEADER_LENS`) of ``payload`` stored under ``key``."""
    assert header_len in HEADER_LENS, header_len
    packed = HEADER.pack(MAGIC, header_len, 0, len(payload), zlib.crc32(payload), key_digest(key))
    return packed.ljust(header_len, b"\0")


def parse_header(key: str, where: str, raw: bytes | memoryview, *,
                 header_lens: tuple[int, ...] = HEADER_LENS) -> tuple[int, int, int]:
    """(header_len, payload_len, crc32) of the block whose bytes start with ``raw``; BlockCorrupt naming ``where``
    if they are too short or not a header for ``key`` with a length in ``header_lens``."""
    if len(raw) < HEADER.size:
        raise BlockCorrupt(f"{where} is truncated: {len(raw)}-byte header")
    magic, header_len, _, payload_len, crc, digest = HEADER.unpack_from(raw)
    if magic != MAGIC or digest != key_digest(key) or header_len not in header_lens:
        raise BlockCorrupt(f"{where} has a bad header (not a UCM block for key {key})")
    return header_len, payload_len, crc


def check_length(where: str, payload_len: int, expected: int) -> None:
    """BlockCorrupt unless the header's ``payload_len`` is the ``expected`` block size."""
    if payload_len != expected:
        raise BlockCorrupt(f"{where} holds {payload_len} bytes, {expected} expected")


def check_complete(where: str, got: int, payload_len: int) -> None:
    """BlockCorrupt if fewer than ``payload_len`` payload bytes (``got``) are there."""
    if got < payload_len:
        raise BlockCorrupt(f"{where} is truncated: {got} of {payload_len} payload bytes")


def check_crc(where: str, payload: memoryview, crc: int) -> None:
    """BlockCorrupt unless ``payload`` has the header's CRC32."""
    if zlib.crc32(payload) != crc:
        raise BlockCorrupt(f"{where} failed its CRC32 check (corrupt payload)")


def object_payload_len(where: str, object_len: int) -> int:
    """Payload bytes of a framed object of ``object_len`` bytes; BlockCorrupt if it cannot hold a header."""
    if object_len < SMALL_HEADER:
        raise BlockCorrupt(f"{where} is truncated: {object_len}-byte object")
    return object_len - SMALL_HEADER


def frame(key: str, src: torch.Tensor) -> tuple[bytes, memoryview]:
    """(64-byte header, payload) of the object holding block ``src`` (1-D uint8 CPU) under ``key``, in that order."""
    payload = memoryview(src.numpy())
    return pack_header(key, payload), payload


def unframe_into(key: str, where: str, blob: memoryview, dst: torch.Tensor) -> None:
    """Verify the framed object ``blob`` (64-byte header, exact length, CRC32) and copy its payload into ``dst``
    (1-D uint8 CPU, the expected payload size); BlockCorrupt naming ``where`` (``dst`` untouched) if any check fails."""
    got = object_payload_len(where, len(blob))
    _, payload_len, crc = parse_header(key, where, blob, header_lens=(SMALL_HEADER,))
    check_length(where, payload_len, dst.numel())
    check_complete(where, got, payload_len)
    if got != payload_len:
        raise BlockCorrupt(f"{where} has {got - payload_len} bytes past its {payload_len}-byte payload")
    payload = blob[SMALL_HEADER:]
    check_crc(where, payload, crc)
    memoryview(dst.numpy())[:] = payload
