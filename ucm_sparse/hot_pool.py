"""The two memories of GSA's offload mode: every piece in pinned host memory, a budget of hot pieces on the device.

A piece is one (block, KV head) of one layer, its K then V (``2 * block_size * head_dim`` values), addressed by
``host_block * num_kv_heads + head``. :class:`HostKV` keeps a layer's pieces in one pinned buffer adopted by the
store's Cache tier; :class:`HotPool` keeps a layer's device slots and the maps between pieces and slots, all on the
device, so a decode step finds its misses, picks their slots and copies them without waiting for the host
(``ucm_kernels.residency``; plain torch on a CPU).
"""
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ucm_kernels import residency
from ucm_kernels._utils import evenly_strided_rows
from ucm_store import CacheTier, block_key

NEVER = -1  # stamp of a slot that holds nothing


class Fetch(NamedTuple):
    """Pieces a :meth:`HotPool.admit` made resident: ``pieces[k]`` goes to ``slots[k]`` for ``k < count[0]``."""

    pieces: torch.Tensor  # [n] int64 host pieces (-1: nothing to copy)
    slots: torch.Tensor  # [n] int64 slots
    count: torch.Tensor  # [1] int32, on the pool's device

    def record_stream(self, stream) -> None:
        """Keep the tensors alive until ``stream``'s queued work has used them (a copy on another stream)."""
        for tensor in self:
            tensor.record_stream(stream)


class HostKV:
    """Every layer's pieces in pinned host memory adopted by a :class:`CacheTier`, and the host block allocator."""

    def __init__(self, cache: CacheTier, num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int,
                 head_dim: int, dtype: torch.dtype):
        self.cache, self.num_blocks, self.num_kv_heads = cache, num_blocks, num_kv_heads
        self.piece_numel = 2 * block_size * head_dim
        self._keys, self._rows = [], []
        nbytes = num_blocks * num_kv_heads * self.piece_numel * dtype.itemsize
        for layer in range(num_layers):
            key = block_key(f"ucm_sparse.offload/{uuid.uuid4().hex}/{layer}".encode())
            buf = cache.allocate(nbytes)
            if not cache.adopt(key, buf, pinned=True):
                cache.pool.release(buf)
                raise RuntimeError(f"Cache tier already holds key {key}")
            self._keys.append(key)
            self._rows.append(buf.view(dtype).view(num_blocks * num_kv_heads, self.piece_numel))
        self._free = list(range(num_blocks - 1, -1, -1))

    def rows(self, layer: int) -> torch.Tensor:
        """``[num_blocks * num_kv_heads, 2 * block_size * head_dim]`` pieces of ``layer`` (K then V)."""
        return self._rows[layer]

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"host KV full: all {self.num_blocks} host blocks are in use (raise host_blocks)")
        return self._free.pop()

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(blocks)

    def close(self) -> None:
        """Give the buffers back to the Cache tier's pool."""
        for key in self._keys:
            self.cache.unpin(key)
            self.cache.remove(key)
        self._keys, self._rows = [], []


class HotPool:
    """One layer's device slots of pieces: eviction by age (stamps), pinned slots, the piece <-> slot maps.

    Stamps: ``2 * step`` when a step reads a slot, ``2 * step - 1`` when the step's prefetch predicts it.
    ``backend``: "triton" runs the residency kernels (no host sync; their argument checks are skipped: the pool
    builds every tensor it hands them, and the offload mode checks the host KV is pinned once), "torch" the
    plain-torch twins (CPU).
    """

    def __init__(self, capacity: int, host_pieces: int, block_size: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, backend: str):
        self.capacity, self.backend = capacity, backend
        self.kv = torch.empty(capacity, 2, block_size, 1, head_dim, dtype=dtype, device=device)
        self.slot_of = torch.full((host_pieces,), -1, dtype=torch.int64, device=device)
        self.piece_in = torch.full((capacity,), -1, dtype=torch.int64, device=device)
        self.stamp = torch.full((capacity,), NEVER, dtype=torch.int64, device=device)
        self.pinned = torch.zeros(capacity, dtype=torch.bool, device=device)

    @property
    def key_cache(self) -> torch.Tensor:  # [capacity, block_size, 1, head_dim]
        return self.kv[:, 0]

    @property
    def value_cache(self) -> torch.Tensor:
        return self.kv[:, 1]

    @property
    def rows(self) -> torch.Tensor:  # [capacity, 2 * block_size * head_dim]
        return self.kv.view(self.capacity, -1)

    def admit(self, pieces: torch.Tensor, wanted: torch.Tensor, *, below: int, stamp: int, max_new: int,
              tally: torch.Tensor) -> tuple[torch.Tensor, "Fetch"]:
        """Make ``pieces[wanted]`` (``[n]`` int64, distinct where wanted) resident and stamped ``stamp``; misses
        take evictable slots (stamped below ``below``, not pinned; the oldest first), at most ``max_new`` of them.
        ``tally`` ``[2]`` int64 ``+=`` (wanted, admitted). Returns the slots ``[n]`` (-1: not wanted or not
        admitted) and the admitted pieces, whose bytes :meth:`fetch` brings in."""
        args = (self.slot_of, self.piece_in, self.stamp, self.pinned, pieces, wanted)
        kwargs = dict(below=below, stamp_value=stamp, max_new=max_new, tally=tally)
        if self.backend == "triton":
            slots, pieces, targets, count = residency.admit(*args, **kwargs, validate=False)
        else:
            slots, pieces, targets, count = residency.torch_admit(*args, **kwargs)
        return slots, Fetch(pieces, targets, count)

    def admit_selection(self, sel_idx: torch.Tensor, sel_count: torch.Tensor, block_table: torch.Tensor, *,
                        below: int, stamp: int, tally: torch.Tensor, host_rows: torch.Tensor,
                        tokens: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, "Fetch"]:
        """:meth:`admit` every piece a block selection lists (``sel_idx`` ``[batch, heads, width]``, ``sel_count``
        ``[batch, heads]`` int32 over ``block_table`` ``[batch, max_blocks]`` int32 host blocks) and copy the
        admitted ones in from ``host_rows`` in the same launches; ``tokens`` = (pieces, offsets, key, value) as
        :meth:`write_tokens` takes them are written in the same launches too (their pieces resident). Returns the
        attention table ``[batch * heads, max_blocks]`` int32 (slot of each listed logical block per (request, KV
        head) row), the pieces ``[batch, heads, width]`` int64 (-1 unlisted) and the admitted ones (copied)."""
        args = (self.slot_of, self.piece_in, self.stamp, self.pinned, _rows_of_entries(sel_idx), sel_count.contiguous(),
                _rows_of_entries(block_table))
        kwargs = dict(below=below, stamp_value=stamp, max_new=sel_idx.numel(), tally=tally,
                      rows=(host_rows, self.rows), tokens=None if tokens is None else (self.kv, *tokens))
        if self.backend == "triton":
            table, pieces, targets_pieces, targets, count = residency.admit_selection(*args, **kwargs,
                                                                                      validate=False)
        else:
            table, pieces, targets_pieces, targets, count = residency.torch_admit_selection(*args, **kwargs)
        return table, pieces, Fetch(targets_pieces, targets, count)

    def write_tokens(self, pieces: torch.Tensor, offsets: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     stamp: int) -> torch.Tensor:
        """Write one token (``key`` / ``value`` ``[n, head_dim]``) at ``offsets`` into each resident piece of
        ``pieces`` (``[n]`` int64), pin and stamp their slots; returns the slots."""
        args = (self.kv, self.slot_of, self.stamp, self.pinned, pieces, offsets, key, value)
        if self.backend == "triton":
            return residency.write_tokens(*args, stamp_value=stamp, validate=False)
        return residency.torch_write_tokens(*args, stamp_value=stamp)

    def fetch(self, host_rows: torch.Tensor, fetch: "Fetch", programs: int = 256) -> None:
        """Copy the admitted pieces in from ``host_rows`` (pieces of -1 are skipped), over ``programs`` copy
        programs."""
        self.copy(host_rows, self.rows, fetch.pieces, fetch.slots, fetch.count, programs)

    def copy(self, src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
             count: torch.Tensor, programs: int = 256) -> None:
        """Rows ``dst[dst_idx[k]] = src[src_idx[k]]`` for ``k < count[0]`` (``src_idx`` -1: skipped)."""
        if self.backend == "triton":
            residency.copy_rows(src, dst, src_idx, dst_idx, count, programs=programs, validate=False)
        else:
            residency.torch_copy_rows(src, dst, src_idx, dst_idx, count)

    def drop(self, pieces: torch.Tensor) -> None:
        """Forget ``pieces`` (a finished request): their slots become free."""
        slots = self.slot_of[pieces]
        slots = slots[slots >= 0]
        self.piece_in.index_fill_(0, slots, -1)
        self.stamp.index_fill_(0, slots, NEVER)
        self.pinned.index_fill_(0, slots, False)
        self.slot_of.index_fill_(0, pieces, -1)


def _rows_of_entries(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the residency kernels read it: a padded view as it is, any other layout copied."""
    return tensor if evenly_strided_rows(tensor) else tensor.contiguous()
