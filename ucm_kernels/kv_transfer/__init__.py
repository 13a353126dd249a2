"""Gather/scatter of paged KV-cache blocks to and from block-major staging rows, one launch per batch.

``triton.py``: the kernel (GPU, or the interpreter); ``torch.py``: the vectorised twin, the CPU path
(``torch_gather_blocks`` / ``torch_scatter_blocks``); ``naive.py``: the loop reference the tests compare against.
"""
from ucm_kernels.kv_transfer.layout import (LAYOUT_SHAPES, OPAQUE, SUPPORTED_DTYPES, PagedKVLayout, block_segments,
                                            detect_layout)
from ucm_kernels.kv_transfer.torch import gather_blocks as torch_gather_blocks
from ucm_kernels.kv_transfer.torch import scatter_blocks as torch_scatter_blocks
from ucm_kernels.kv_transfer.triton import (check_block_ids, gather_blocks, gather_blocks_into_rows, scatter_blocks,
                                            scatter_blocks_from_rows)

__all__ = ["LAYOUT_SHAPES", "OPAQUE", "SUPPORTED_DTYPES", "PagedKVLayout", "block_segments", "check_block_ids",
           "detect_layout", "gather_blocks", "gather_blocks_into_rows", "scatter_blocks", "scatter_blocks_from_rows",
           "torch_gather_blocks", "torch_scatter_blocks"]
