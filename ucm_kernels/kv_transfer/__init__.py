"""Gather/scatter of paged KV-cache blocks to and from block-major staging rows, one launch per batch."""
from ucm_kernels.kv_transfer.triton import (LAYOUT_SHAPES, SUPPORTED_DTYPES, PagedKVLayout, check_block_ids,
                                            detect_layout, gather_blocks, scatter_blocks)

__all__ = ["LAYOUT_SHAPES", "SUPPORTED_DTYPES", "PagedKVLayout", "check_block_ids", "detect_layout",
           "gather_blocks", "scatter_blocks"]
