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

    ``out``: uint8 ``[n, num_layers, num_segments, segment_bytes]`` on the layers' device; returned.
    """
    rows = torch.nonzero(block_ids >= 0).flatten()
    blocks = block_ids[rows].long()
    for index, layer in enumerate(layers):
        out[rows, index] = block_segments(layer, kind)[blocks]
    return out


def naive_scatter_blocks(staging: torch.Tensor, block_ids: torch.Tensor, layers: Sequence[torch.Tensor],
                         kind: str) -> None:
    """Block ``block_ids[i]`` of ``layers[l]`` = ``staging[i, l]`` for every id >= 0; other blocks untouched.

    ``staging``: uint8 ``[n, num_layers, num_segments, segment_bytes]`` on the layers' device.
    """
    rows = torch.nonzero(block_ids >= 0).flatten()
    blocks = block_ids[rows].long()
    for index, layer in enumerate(layers):
        block_segments(layer, kind)[blocks] = staging[rows, index]
