"""Vectorised torch twin of the kv_transfer gather/scatter: the block copy path on a CPU (no Triton).

Every layout is read through :func:`~ucm_kernels.kv_transfer.layout.block_segments`, a uint8
``[num_blocks, num_segments, segment_bytes]`` view of one layer; staging rows are
``[n_ids, num_layers, num_segments, segment_bytes]`` uint8.
"""
from collections.abc import Sequence

import torch

from ucm_kernels.kv_transfer.layout import PagedKVLayout, block_segments


def gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor,
                  layout: PagedKVLayout) -> torch.Tensor:
    """``out[i, l] = block block_ids[i] of layers[l]`` for every id >= 0; rows of -1 ids untouched.

    ``out``: uint8, ``n * layout.row_bytes`` contiguous bytes on the layers' device; returned. One
    ``index_select`` per layer over the widest integer words the segments allow (byte-wise indexing is ~15x
    slower on a CPU, where this is also the transport's block mover).
    """
    rows, blocks, every_row = _valid_rows(block_ids)
    staging = out.view(layout.staging_shape(block_ids.numel()))
    for index, layer in enumerate(layers):
        picked = _words(block_segments(layer, layout)).index_select(0, blocks)
        target = _words(staging)[:, index]
        if every_row:
            target.copy_(picked)
        else:
            target.index_copy_(0, rows, picked)
    return out


def scatter_blocks(staging: torch.Tensor, block_ids: torch.Tensor, layers: Sequence[torch.Tensor],
                   layout: PagedKVLayout) -> None:
    """Block ``block_ids[i]`` of ``layers[l]`` = ``staging[i, l]`` for every id >= 0; other blocks untouched.

    ``staging``: uint8, ``n * layout.row_bytes`` contiguous bytes on the layers' device. Ids >= 0 must be
    distinct (for a repeated id, which row lands is unspecified).
    """
    rows, blocks, every_row = _valid_rows(block_ids)
    staging = staging.view(layout.staging_shape(block_ids.numel()))
    for index, layer in enumerate(layers):
        source = _words(staging)[:, index]
        rows_in = source if every_row else source.index_select(0, rows)
        _words(block_segments(layer, layout)).index_copy_(0, blocks, rows_in)


def _valid_rows(block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(rows whose id is >= 0, their ids as int64, whether that is every row)."""
    rows = torch.nonzero(block_ids >= 0).flatten()
    return rows, block_ids[rows].long(), rows.numel() == block_ids.numel()


def _words(segments: torch.Tensor) -> torch.Tensor:
    """``segments`` (uint8, last dim contiguous) viewed as the widest integer words its strides allow."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if segments.shape[-1] % size == 0 and segments.data_ptr() % size == 0 and all(
                stride % size == 0 for stride in segments.stride()[:-1]):
            return segments.view(dtype)
    return segments
