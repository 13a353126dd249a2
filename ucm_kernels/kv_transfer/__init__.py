"""Gather/scatter of paged KV-cache blocks to and from block-major staging rows, one launch per batch."""
from ucm_kernels.kv_transfer.layout import (LAYOUT_SHAPES, OPAQUE, SUPPORTED_DTYPES, PagedKVLayout, block_segments,
                                            detect_layout)
from ucm_kernels.kv_transfer.triton import (check_block_ids, gather_blocks, gather_blocks_into_rows, scatter_blocks,
                                            scatter_blocks_from_rows)

__all__ = ["LAYOUT_SHAPES", "OPAQUE", "SUPPORTED_DTYPES", "PagedKVLayout", "block_segments", "check_block_ids",
           "detect_layout", "gather_blocks", "gather_blocks_into_rows", "scatter_blocks", "scatter_blocks_from_rows"]
