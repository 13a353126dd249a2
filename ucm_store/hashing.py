"""Chained prefix hashes of token blocks: the ids under which KV blocks are stored.

Block ``i`` of a token sequence gets a 128-bit id that depends on every token of blocks ``0..i`` (chained
through the parent id), on the request's extra keys (LoRA name, cache salt, ...) and on a namespace (model,
dtype, KV layout, TP size and rank, block size), so two requests share an id exactly when they share the whole
prefix under the same model and cache layout. Ids are deterministic across processes and machines: no
Python ``hash()``, no random seed.

The per-token mixing is a non-cryptographic 2 x 64-bit multiply-rotate chain (Numba, about 1 ns a token);
:func:`chain_hash_reference` is its plain-Python twin that the tests hold it to (about 1 us a token). A process
that should not load Numba (vLLM's scheduler process: Numba and LLVM add about 117 MiB of RSS) hashes with the twin:
``BlockHasher(namespace, jit=False)``; the ids are the same. The namespace and extra keys
enter through BLAKE2b, so a tenant's ``cache_salt`` keeps its blocks apart from everyone else's.
"""
import dataclasses
import hashlib
import json

import numpy as np

from ucm_store.lazyjit import lazy_njit

ID_BYTES = 16
_MASK = (1 << 64) - 1
_P1, _P2, _P3, _P4 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63
_F1, _F2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53


@dataclasses.dataclass(frozen=True)
class HashNamespace:
    """What makes two caches incompatible: blocks hash apart unless all of these match."""

    model: str
    dtype: str
    kv_layout: str
    block_size: int
    tp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size}: must be >= 1")
        if not 0 <= self.rank < self.tp_size:
            raise ValueError(f"rank={self.rank}, tp_size={self.tp_size}: need 0 <= rank < tp_size")

    def root(self, extra_keys: tuple = ()) -> bytes:
        """The 16-byte chain root for a request with ``extra_keys`` (str / int / bytes values)."""
        fields = dataclasses.asdict(self)
        extra = [k.hex() if isinstance(k, bytes) else k for k in extra_keys]
        text = json.dumps({"ns": fields, "extra": extra}, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=ID_BYTES).digest()


class BlockHasher:
    """Hashes token sequences into block ids under one namespace."""

    def __init__(self, namespace: HashNamespace, jit: bool = True):
        """``jit``: hash with the Numba kernel (else its plain-Python twin: the same ids, no Numba in the process)."""
        self.namespace = namespace
        self.block_size = namespace.block_size
        self.jit = jit

    def block_ids(self, token_ids, extra_keys: tuple = (), parent: bytes | None = None) -> list[bytes]:
        """One 16-byte id per FULL block of ``token_ids`` (sequence or int array, ``[n_tokens]``).

        ``parent`` continues a chain: the id of the block just before ``token_ids[0]``.
        """
        return ids_to_bytes(self.hash_array(token_ids, extra_keys, parent))

    def hash_array(self, token_ids, extra_keys: tuple = (), parent: bytes | None = None) -> np.ndarray:
        """Block ids as a ``[n_full_blocks, 2]`` uint64 array (the zero-copy form of :meth:`block_ids`)."""
        tokens = as_token_array(token_ids)
        start = parent if parent is not None else self.namespace.root(tuple(extra_keys))
        if len(start) != ID_BYTES:
            raise ValueError(f"parent: expected a {ID_BYTES}-byte block id, got {len(start)} bytes")
        hi, lo = np.frombuffer(start, dtype="<u8")
        if not self.jit:
            ids = chain_hash_reference(tokens.tolist(), self.block_size, int(hi), int(lo))
            return np.array(ids, dtype=np.uint64).reshape(-1, 2)
        out = np.empty((tokens.size // self.block_size, 2), dtype=np.uint64)
        chain_hash(tokens, self.block_size, np.uint64(hi), np.uint64(lo), out)
        return out


def as_token_array(token_ids) -> np.ndarray:
    """``token_ids`` as a 1-D int64 array; ValueError for other shapes, non-integers or negative ids."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 1:
        raise ValueError(f"token_ids: expected a 1-D sequence, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token_ids: expected integers, got dtype {tokens.dtype}")
    tokens = tokens.astype(np.int64, copy=False)
    if tokens.size and tokens.min() < 0:
        raise ValueError(f"token_ids: negative token id {int(tokens.min())}; ids must be >= 0")
    return np.ascontiguousarray(tokens)


def ids_to_bytes(ids: np.ndarray) -> list[bytes]:
    """``[n, 2]`` uint64 ids -> list of n 16-byte ids (little-endian hi then lo)."""
    return np.ascontiguousarray(ids, dtype="<u8").view(f"V{ID_BYTES}").ravel().tolist()


@lazy_njit(cache=True, nogil=True)
def chain_hash(tokens, block_size, seed_hi, seed_lo, out):
    """Chained 128-bit ids of full blocks: ``tokens`` int64 [n], ``out`` uint64 [n // block_size, 2]."""

    def rotl(x, r):
        return (x << np.uint64(r)) | (x >> np.uint64(64 - r))

    def fmix(x):
        x ^= x >> np.uint64(33)
        x *= np.uint64(_F1)
        x ^= x >> np.uint64(33)
        x *= np.uint64(_F2)
        return x ^ (x >> np.uint64(33))

    a, b = seed_hi, seed_lo
    for blk in range(out.shape[0]):
        a ^= np.uint64(_P1)
        b ^= np.uint64(_P2)
        for i in range(blk * block_size, (blk + 1) * block_size):
            t = np.uint64(tokens[i])
            a = rotl(a + t * np.uint64(_P2), 31) * np.uint64(_P1)
            b = rotl(b + t * np.uint64(_P4), 27) * np.uint64(_P3)
        a = fmix(a ^ np.uint64(block_size))
        b = fmix(b + a)
        a = fmix(a + b)
        out[blk, 0] = a
        out[blk, 1] = b


def chain_hash_reference(tokens: list[int], block_size: int, seed_hi: int, seed_lo: int) -> list[tuple[int, int]]:
    """Plain-Python twin of :func:`chain_hash` (same arithmetic on Python ints masked to 64 bits; a rotated word is
    masked only after its multiplication, which keeps the low 64 bits the same)."""

    def fmix(x: int) -> int:
        x ^= x >> 33
        x = (x * _F1) & _MASK
        x ^= x >> 33
        x = (x * _F2) & _MASK
        return x ^ (x >> 33)

    a, b, out = seed_hi, seed_lo, []
    for blk in range(len(tokens) // block_size):
        a, b = a ^ _P1, b ^ _P2
        for t in tokens[blk * block_size:(blk + 1) * block_size]:
            x = (a + t * _P2) & _MASK
            a = ((x << 31 | x >> 33) * _P1) & _MASK
            y = (b + t * _P4) & _MASK
            b = ((y << 27 | y >> 37) * _P3) & _MASK
        a = fmix(a ^ block_size)
        b = fmix((b + a) & _MASK)
        a = fmix((a + b) & _MASK)
        out.append((a, b))
    return out
