"""Triton gather/scatter of paged KV-cache blocks to and from block-major staging rows.

A paged KV cache is one tensor per layer. In every layout we move, one block of one layer is a few evenly spaced
contiguous byte segments (K and V apart in the classic FlashAttention layout, one segment in the others);
:class:`~ucm_kernels.kv_transfer.layout.PagedKVLayout` records that geometry. One kernel copies every (block, layer,
segment) of a batch of block ids in a single launch, as 8-byte words where alignment allows (narrower words
otherwise), so the same kernel serves every layout and dtype, fp8 included. Per-layer tensors are separate
allocations, so the kernel takes a device table of their base addresses and casts each entry to a pointer.

Staging rows are block-major, ``[n_ids, num_layers, num_segments, segment_bytes]`` uint8: row ``i`` holds all
layers of block ``block_ids[i]`` together (the unit a store writes to a file). Ids of -1 are skipped and
their rows left untouched. For a CUDA cache the staging buffer may be GPU memory or pinned host memory,
which the kernel then reads or writes directly over PCIe.
"""
import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ucm_kernels._utils import alignment, check_device, next_pow2, triton_interpreting
from ucm_kernels.staging import host_to_device
from ucm_kernels.kv_transfer.layout import PagedKVLayout, detect_layout
from ucm_kernels.kv_transfer.torch import gather_blocks as torch_gather_blocks
from ucm_kernels.kv_transfer.torch import scatter_blocks as torch_scatter_blocks

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
_TL_WORDS = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}
# Bytes one program copies per loop step: two steps cover a 32 KiB Llama segment; 4 warps, 128 B per thread.
_STEP_BYTES = 16 << 10
_NUM_WARPS = 4


def check_block_ids(block_ids: torch.Tensor, layout: PagedKVLayout) -> None:
    """Raise ValueError unless ``block_ids`` is a 1-D int32/int64 tensor of -1 or 0..num_blocks-1.

    Reads the ids' min and max: one device-to-host sync for ids on a GPU.
    """
    if not isinstance(block_ids, torch.Tensor) or block_ids.dim() != 1 or block_ids.dtype not in (torch.int32,
                                                                                                 torch.int64):
        got = f"{block_ids.dtype} of shape {tuple(block_ids.shape)}" if isinstance(block_ids, torch.Tensor) else (
            type(block_ids).__name__)
        raise ValueError(f"block_ids: got {got}, expected a 1-D int32 or int64 tensor")
    if block_ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(block_ids))
    if low < -1 or high >= layout.num_blocks:
        raise ValueError(f"block_ids: values span [{low}, {high}], expected -1 (skip) or 0..{layout.num_blocks - 1}")


def gather_blocks(layers: Sequence[torch.Tensor], block_ids: torch.Tensor, out: torch.Tensor | None = None, *,
                  kind: str | None = None, layout: PagedKVLayout | None = None,
                  check_ids: bool = True) -> torch.Tensor:
    """Copy blocks ``block_ids`` of a paged KV cache into block-major staging rows, all layers in one launch.

    Args:
        layers: per-layer paged caches (see :func:`detect_layout`).
        block_ids: [n] int32/int64 on the cache's device; row i receives block ``block_ids[i]``, -1 skips row i.
        out: contiguous uint8 tensor of ``n * layout.row_bytes`` bytes on the cache's device or, for a CUDA
            cache, in pinned host memory (written over PCIe); allocated on the cache's device when None.
        kind: layout name, for shapes :func:`detect_layout` cannot tell apart.
        layout: ``detect_layout(layers)`` computed earlier; the layers are then not re-checked.
        check_ids: range-check ``block_ids`` (a device sync for GPU ids); False only for ids checked already.
    Returns:
        uint8 ``[n, num_layers, num_segments, segment_bytes]`` view of ``out``; rows of -1 ids are untouched.
    """
    layout, ids = _checked_inputs(layers, block_ids, kind, layout, check_ids)
    if out is None:
        out = torch.empty(layout.staging_shape(ids.numel()), dtype=torch.uint8, device=layers[0].device)
    staging = _checked_staging("out", out, ids.numel(), layout, layers[0].device)
    _copy_blocks(layout, layers, ids, staging, to_staging=True)
    return staging


def scatter_blocks(staging: torch.Tensor, block_ids: torch.Tensor, layers: Sequence[torch.Tensor], *,
                   kind: str | None = None, layout: PagedKVLayout | None = None, check_ids: bool = True) -> None:
    """Copy block-major staging rows into blocks ``block_ids`` of a paged KV cache, all layers in one launch.

    Args:
        staging: contiguous uint8 tensor of ``n * layout.row_bytes`` bytes (rows as :func:`gather_blocks`
            writes them) on the cache's device or, for a CUDA cache, in pinned host memory.
        block_ids: [n] int32/int64 on the cache's device; row i goes to block ``block_ids[i]``, -1 skips row i.
            Ids must be distinct (apart from -1): for a repeated id, which of its rows lands is unspecified.
        layers: per-layer paged caches (see :func:`detect_layout`), written in place; other blocks untouched.
        kind, layout, check_ids: as for :func:`gather_blocks`.
    """
    layout, ids = _checked_inputs(layers, block_ids, kind, layout, check_ids)
    rows = _checked_staging("staging", staging, ids.numel(), layout, layers[0].device)
    _copy_blocks(layout, layers, ids, rows, to_staging=False)


def gather_blocks_into_rows(layers: Sequence[torch.Tensor], block_ids: torch.Tensor, rows: Sequence[torch.Tensor],
                            *, layout: PagedKVLayout) -> None:
    """Copy block ``block_ids[i]`` of a paged KV cache into ``rows[i]``, all layers in one launch.

    Args:
        layers: per-layer paged caches described by ``layout`` (see :func:`detect_layout`).
        block_ids: [n] int32/int64 on the cache's device, in range (not checked here: no device sync).
        rows: n contiguous uint8 tensors of ``layout.row_bytes`` bytes each, anywhere the kernel can write:
            the cache's device or, for a CUDA cache, pinned host memory (e.g. separate pool buffers).
        layout: the caches' layout.
    """
    _check_rows("rows", rows, block_ids, layout, layers[0].device)
    _copy_blocks(layout, layers, block_ids.contiguous(), rows, to_staging=True)


def scatter_blocks_from_rows(rows: Sequence[torch.Tensor], block_ids: torch.Tensor, layers: Sequence[torch.Tensor],
                             *, layout: PagedKVLayout) -> None:
    """Copy ``rows[i]`` into block ``block_ids[i]`` of a paged KV cache (distinct ids), all layers in one launch;
    arguments as for :func:`gather_blocks_into_rows`."""
    _check_rows("rows", rows, block_ids, layout, layers[0].device)
    _copy_blocks(layout, layers, block_ids.contiguous(), rows, to_staging=False)


@triton.jit
def _kv_block_copy_kernel(
    layer_addrs,  # [num_layers] int64: base address of each layer's paged cache
    block_ids,  # [n_ids] int32/int64: cache block of each staging row, -1 = skip the row
    staging,  # [n_ids, num_layers * NUM_SEGMENTS, SEGMENT_WORDS] words (int8..int64 by alignment); ROW_TABLE:
    # [n_ids] int64 base address of each row instead (rows anywhere: e.g. separate pinned host buffers)
    block_stride,  # int64, words from one block of a layer to the next
    segment_stride,  # int64, words from the K segment of a block to its V segment
    num_layers,
    NUM_SEGMENTS: tl.constexpr,
    SEGMENT_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,  # words per loop step
    ALIGN: tl.constexpr,  # bytes every segment address is a multiple of (enables vector loads)
    TO_STAGING: tl.constexpr,  # True: cache -> staging (gather); False: staging -> cache (scatter)
    ROW_TABLE: tl.constexpr,  # staging holds row addresses (see above)
    WORD: tl.constexpr,  # the word dtype (for row addresses cast to pointers)
):
    row = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)  # layer * NUM_SEGMENTS + segment
    block = tl.load(block_ids + row).to(tl.int64)
    if block >= 0:
        layer_base = tl.load(layer_addrs + plane // NUM_SEGMENTS).to(tl.pointer_type(WORD), bitcast=True)
        cache_seg = layer_base + block * block_stride + (plane % NUM_SEGMENTS) * segment_stride
        cache_seg = tl.multiple_of(cache_seg, ALIGN)
        if ROW_TABLE:
            row_base = tl.load(staging + row).to(tl.pointer_type(WORD), bitcast=True)
            staging_seg = row_base + plane * SEGMENT_WORDS
        else:
            staging_seg = staging + (row * num_layers * NUM_SEGMENTS + plane) * SEGMENT_WORDS
        staging_seg = tl.multiple_of(staging_seg, ALIGN)
        offsets = tl.arange(0, BLOCK)
        for start in tl.range(0, SEGMENT_WORDS, BLOCK):
            words = start + offsets
            mask = words < SEGMENT_WORDS
            if TO_STAGING:
                tl.store(staging_seg + words, tl.load(cache_seg + words, mask=mask), mask=mask)
            else:
                tl.store(cache_seg + words, tl.load(staging_seg + words, mask=mask), mask=mask)


def _copy_blocks(layout: PagedKVLayout, layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                 staging: torch.Tensor | Sequence[torch.Tensor], to_staging: bool) -> None:
    """Run the copy: the Triton kernel on a GPU or under the interpreter, plain torch indexing on a CPU.
    ``staging``: the rows as one tensor, or one tensor per row (a device table of their addresses is built)."""
    if block_ids.numel() == 0:
        return
    if block_ids.device.type == "cpu" and not triton_interpreting():
        _copy_blocks_torch(layout, layers, block_ids, staging, to_staging)
        return
    table, table_align = _layer_table(tuple(layer.data_ptr() for layer in layers), block_ids.device)
    by_row = not isinstance(staging, torch.Tensor)
    row_addrs = [row.data_ptr() for row in staging] if by_row else [staging.data_ptr()]
    align = min(table_align, alignment(*row_addrs, layout.segment_bytes, layout.block_stride_bytes,
                                        layout.segment_stride_bytes))
    word = min(align, 8)
    segment_words = layout.segment_bytes // word
    rows = (host_to_device(torch.tensor(row_addrs, dtype=torch.int64), block_ids.device) if by_row
            else staging.view(-1).view(_WORD_DTYPES[word]))
    grid = (block_ids.numel(), layout.num_layers * layout.num_segments)
    _kv_block_copy_kernel[grid](
        layer_addrs=table, block_ids=block_ids, staging=rows,
        block_stride=layout.block_stride_bytes // word, segment_stride=layout.segment_stride_bytes // word,
        num_layers=layout.num_layers, NUM_SEGMENTS=layout.num_segments, SEGMENT_WORDS=segment_words,
        BLOCK=min(next_pow2(segment_words), _STEP_BYTES // word), ALIGN=align,
        TO_STAGING=to_staging, ROW_TABLE=by_row, WORD=_TL_WORDS[word], num_warps=_NUM_WARPS)


def _copy_blocks_torch(layout: PagedKVLayout, layers: Sequence[torch.Tensor], block_ids: torch.Tensor,
                       staging: torch.Tensor | Sequence[torch.Tensor], to_staging: bool) -> None:
    """The torch twin's copy (the CPU path), row by row when the rows are separate tensors."""
    pairs = [(block_ids, staging)] if isinstance(staging, torch.Tensor) else [
        (block_ids[i:i + 1], row) for i, row in enumerate(staging)]
    for ids, rows in pairs:
        if to_staging:
            torch_gather_blocks(layers, ids, rows, layout)
        else:
            torch_scatter_blocks(rows, ids, layers, layout)


@functools.lru_cache(maxsize=64)
def _layer_table(addresses: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int]:
    """Device int64 table of the layers' base addresses and the alignment they share (cached per address set)."""
    return torch.tensor(addresses, dtype=torch.int64, device=device), alignment(*addresses)


def _checked_inputs(layers, block_ids, kind, layout, check_ids) -> tuple[PagedKVLayout, torch.Tensor]:
    if layout is None:
        layout = detect_layout(layers, kind)
    elif len(layers) != layout.num_layers:
        raise ValueError(f"layers: {len(layers)} tensors, but layout describes {layout.num_layers} layers")
    if check_ids:
        check_block_ids(block_ids, layout)
    check_device("block_ids", block_ids, layers[0].device)
    return layout, block_ids.contiguous()


def _check_rows(name: str, rows: Sequence[torch.Tensor], block_ids: torch.Tensor, layout: PagedKVLayout,
                device: torch.device) -> None:
    """Raise ValueError unless ``rows`` are one row per block id, each a row of ``layout`` the kernel can reach.
    Where a row lives (device, pinned: a driver query each) is checked once per storage: pool rows share arenas."""
    if len(rows) != block_ids.numel():
        raise ValueError(f"{name}: {len(rows)} rows for {block_ids.numel()} block ids; need one row per id")
    placed = set()
    for i, row in enumerate(rows):
        storage = row.untyped_storage().data_ptr()
        if (storage not in placed or row.dtype != torch.uint8 or not row.is_contiguous()
                or row.numel() != layout.row_bytes):
            _checked_staging(f"{name}[{i}]", row, 1, layout, device)
            placed.add(storage)


def _checked_staging(name: str, staging: torch.Tensor, n_ids: int, layout: PagedKVLayout,
                     device: torch.device) -> torch.Tensor:
    """``staging`` as ``[n_ids, num_layers, num_segments, segment_bytes]`` after checking dtype, size, place."""
    nbytes = n_ids * layout.row_bytes
    if staging.dtype != torch.uint8 or not staging.is_contiguous() or staging.numel() != nbytes:
        raise ValueError(f"{name}: {staging.dtype} of shape {tuple(staging.shape)} (contiguous="
                         f"{staging.is_contiguous()}); expected a contiguous uint8 tensor of {nbytes} bytes "
                         f"({n_ids} rows of {layout.row_bytes})")
    on_pinned_host = device.type == "cuda" and staging.device.type == "cpu" and staging.is_pinned()
    if staging.device != device and not on_pinned_host:
        raise ValueError(f"{name} is on {staging.device} (pinned={staging.is_pinned()}); expected {device}, or "
                         f"pinned host memory for a CUDA cache")
    return staging.view(layout.staging_shape(n_ids))
