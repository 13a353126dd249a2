"""Plain-torch reference of the kv_transfer gather/scatter (also the copy path on CPU without Triton).

Every layout is read through :func:`block_segments`, a uint8 ``[num_blocks, num_segments, segment_bytes]``
view of one layer; staging rows are ``[n_ids, num_layers, num_segments, segment_bytes]`` uint8.
"""
from collections.abc import Sequence

import torch


def block_segments(layer: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 ``[num_blocks, num_segments, segment_bytes]`` view of one layer's paged cache (writes go through).

    ``kind`` "flash_attn" is ``(2, num_blocks, ...)``: K and V are 2 segments; the other layouts
    ("flashinfer", "mla", "cpu_packed") start with the block dim and a block is 1 segment.
    """
    as_bytes = layer.view(torch.uint8)
    if kind == "flash_attn":
        return as_bytes.transpose(0, 1).view(as_bytes.shape[1], 2, -1)
    return as_bytes.view(as_bytes.shape[0], 1, -1)


def naive_gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor,
                        kind: str) -> torch.Tensor:
    """``out[i, l] = block block_ids[i] of layers[l]`` for every id >= 0; rows of -1 ids untouched.

    ``out``: uint8 ``[n, num_layers, num_segments, segment_bytes]`` on the layers' device; returned. One
    ``index_select`` per layer over the widest integer words the segments allow (byte-wise indexing is ~15x
    slower on a CPU, where this is also the transport's block mover).
    """
    rows, blocks, every_row = _valid_rows(block_ids)
    for index, layer in enumerate(layers):
        picked = _words(block_segments(layer, kind)).index_select(0, blocks)
        target = _words(out)[:, index]
        if every_row:
            target.copy_(picked)
        else:
            target.index_copy_(0, rows, picked)
    return out


def naive_scatter_blocks(staging: torch.Tensor, block_ids: torch.Tensor, layers: Sequence[torch.Tensor],
                         kind: str) -> None:
    """Block ``block_ids[i]`` of ``layers[l]`` = ``staging[i, l]`` for every id >= 0; other blocks untouched.

    ``staging``: uint8 ``[n, num_layers, num_segments, segment_bytes]`` on the layers' device. Ids >= 0 must be
    distinct (for a repeated id, which row lands is unspecified).
    """
    rows, blocks, every_row = _valid_rows(block_ids)
    for index, layer in enumerate(layers):
        source = _words(staging)[:, index]
        _words(block_segments(layer, kind)).index_copy_(0, blocks, source if every_row else source.index_select(0, rows))


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
