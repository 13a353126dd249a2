"""Loop reference of the kv_transfer gather/scatter: block by block, layer by layer, byte segments (tests only).

Every layout is read through :func:`~ucm_kernels.kv_transfer.layout.block_segments`, a uint8
``[num_blocks, num_segments, segment_bytes]`` view of one layer; staging rows are
``[n_ids, num_layers, num_segments, segment_bytes]`` uint8.
"""
from collections.abc import Sequence

import torch

from ucm_kernels.kv_transfer.layout import PagedKVLayout, block_segments


def naive_gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor,
                        layout: PagedKVLayout) -> torch.Tensor:
    """``out[i, l] = block block_ids[i] of layers[l]`` for every id >= 0; rows of -1 ids untouched; returns
    ``out`` (uint8, ``n * layout.row_bytes`` contiguous bytes on the layers' device)."""
    staging = out.view(layout.staging_shape(block_ids.numel()))
    for row, block in enumerate(block_ids.tolist()):
        if block >= 0:
            for index, layer in enumerate(layers):
                staging[row, index] = block_segments(layer, layout)[block]
    return out


def naive_scatter_blocks(staging: torch.Tensor, block_ids: torch.Tensor, layers: Sequence[torch.Tensor],
                         layout: PagedKVLayout) -> None:
    """Block ``block_ids[i]`` of ``layers[l]`` = ``staging[i, l]`` for every id >= 0 (distinct); other blocks
    untouched."""
    staging = staging.view(layout.staging_shape(block_ids.numel()))
    for row, block in enumerate(block_ids.tolist()):
        if block >= 0:
            for index, layer in enumerate(layers):
                block_segments(layer, layout)[block] = staging[row, index]
