"""Triton gather/scatter of paged KV-cache blocks to and from block-major staging rows.

A paged KV cache is one tensor per layer. In every supported layout one block of one layer is 1 or 2
contiguous byte segments (K and V apart in the FlashAttention layout, together in the others);
:class:`PagedKVLayout` records that geometry. One kernel copies every (block, layer, segment) of a batch of
block ids in a single launch, as 8-byte words where alignment allows (narrower words otherwise), so the same
kernel serves every layout and dtype, fp8 included. Per-layer tensors are separate allocations, so the kernel
takes a device table of their base addresses and casts each entry to a pointer.

Staging rows are block-major, ``[n_ids, num_layers, num_segments, segment_bytes]`` uint8: row ``i`` holds all
layers of block ``block_ids[i]`` together (the unit a store writes to a file). Ids of -1 are skipped and
their rows left untouched. For a CUDA cache the staging buffer may be GPU memory or pinned host memory,
which the kernel then reads or writes directly over PCIe.
"""
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ucm_kernels._utils import check_device, triton_interpreting
from ucm_kernels.kv_transfer.naive import naive_gather_blocks, naive_scatter_blocks

LAYOUT_SHAPES = {
    "flash_attn": "(2, num_blocks, block_size, num_kv_heads, head_dim)",
    "flashinfer": "(num_blocks, 2, block_size, num_kv_heads, head_dim)",
    "mla": "(num_blocks, block_size, head_dim)",
    "cpu_packed": "(num_blocks, num_kv_heads, block_size, 2 * head_size)",
}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
                    torch.uint8, torch.int8)
_NDIM = {"flash_attn": 5, "flashinfer": 5, "mla": 3, "cpu_packed": 4}
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
# Bytes one program copies per loop step: two steps cover a 32 KiB Llama segment; 4 warps, 128 B per thread.
_STEP_BYTES = 16 << 10
_NUM_WARPS = 4


@dataclass(frozen=True)
class PagedKVLayout:
    """Byte geometry of a paged KV cache: ``num_layers`` tensors of ``num_blocks`` blocks each; one block of
    one layer is ``num_segments`` contiguous runs of ``segment_bytes`` (2 for flash_attn: K and V)."""

    kind: str  # a key of LAYOUT_SHAPES
    num_layers: int
    num_blocks: int
    num_segments: int
    segment_bytes: int
    block_stride_bytes: int  # from one block of a layer to the next
    segment_stride_bytes: int  # from K to V of one block; 0 when num_segments == 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one block across all layers: one staging row."""
        return self.num_layers * self.num_segments * self.segment_bytes

    def staging_shape(self, n_ids: int) -> tuple[int, int, int, int]:
        """Shape of the uint8 staging rows for ``n_ids`` block ids."""
        return (n_ids, self.num_layers, self.num_segments, self.segment_bytes)


def detect_layout(layers: Sequence[torch.Tensor], kind: str | None = None) -> PagedKVLayout:
    """Check per-layer paged caches and describe them.

    Args:
        layers: one tensor per layer, all of the same shape, strides, dtype (SUPPORTED_DTYPES) and device, in
            one of the layouts of LAYOUT_SHAPES; the dims after the block dim must be row-major contiguous.
        kind: the layout name; guessed from the shape when None (raises if the shape is ambiguous).
    Returns:
        The :class:`PagedKVLayout`; raises ValueError naming what is wrong otherwise.
    """
    if len(layers) == 0:
        raise ValueError("layers: got an empty sequence, expected one paged cache tensor per layer")
    first = layers[0]
    kind = _guess_kind(first) if kind is None else kind
    if kind not in LAYOUT_SHAPES:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(LAYOUT_SHAPES)}")
    _check_layer(first, kind)
    for i, layer in enumerate(layers[1:], start=1):
        if (layer.shape, layer.stride(), layer.dtype, layer.device) != (first.shape, first.stride(), first.dtype,
                                                                        first.device):
            raise ValueError(f"layers[{i}]: shape {tuple(layer.shape)}, strides {layer.stride()}, {layer.dtype} on "
                             f"{layer.device}; expected the same as layers[0]: shape {tuple(first.shape)}, strides "
                             f"{first.stride()}, {first.dtype} on {first.device}")
    two_segments = kind == "flash_attn"
    block_dim = 1 if two_segments else 0
    itemsize = first.element_size()
    layout = PagedKVLayout(kind=kind, num_layers=len(layers), num_blocks=first.shape[block_dim],
                           num_segments=2 if two_segments else 1,
                           segment_bytes=math.prod(first.shape[block_dim + 1:]) * itemsize,
                           block_stride_bytes=first.stride(block_dim) * itemsize,
                           segment_stride_bytes=first.stride(0) * itemsize if two_segments else 0)
    _check_disjoint(layout, first)
    return layout


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


@triton.jit
def _kv_block_copy_kernel(
    layer_addrs,  # [num_layers] int64: base address of each layer's paged cache
    block_ids,  # [n_ids] int32/int64: cache block of each staging row, -1 = skip the row
    staging,  # [n_ids, num_layers * NUM_SEGMENTS, SEGMENT_WORDS] words (int8..int64 by alignment)
    block_stride,  # int64, words from one block of a layer to the next
    segment_stride,  # int64, words from the K segment of a block to its V segment
    num_layers,
    NUM_SEGMENTS: tl.constexpr,
    SEGMENT_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,  # words per loop step
    ALIGN: tl.constexpr,  # bytes every segment address is a multiple of (enables vector loads)
    TO_STAGING: tl.constexpr,  # True: cache -> staging (gather); False: staging -> cache (scatter)
):
    row = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)  # layer * NUM_SEGMENTS + segment
    block = tl.load(block_ids + row).to(tl.int64)
    if block >= 0:
        layer_base = tl.load(layer_addrs + plane // NUM_SEGMENTS).to(staging.dtype, bitcast=True)
        cache_seg = layer_base + block * block_stride + (plane % NUM_SEGMENTS) * segment_stride
        cache_seg = tl.multiple_of(cache_seg, ALIGN)
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
                 staging: torch.Tensor, to_staging: bool) -> None:
    """Run the copy: the Triton kernel on a GPU or under the interpreter, plain torch indexing on a CPU."""
    if block_ids.numel() == 0:
        return
    if block_ids.device.type == "cpu" and not triton_interpreting():
        copy = naive_gather_blocks if to_staging else naive_scatter_blocks
        args = (layers, block_ids, staging) if to_staging else (staging, block_ids, layers)
        copy(*args, kind=layout.kind)
        return
    table, table_align = _layer_table(tuple(layer.data_ptr() for layer in layers), block_ids.device)
    align = min(table_align, _alignment(staging.data_ptr(), layout.segment_bytes, layout.block_stride_bytes,
                                        layout.segment_stride_bytes))
    word = min(align, 8)
    segment_words = layout.segment_bytes // word
    grid = (block_ids.numel(), layout.num_layers * layout.num_segments)
    _kv_block_copy_kernel[grid](
        layer_addrs=table, block_ids=block_ids, staging=staging.view(-1).view(_WORD_DTYPES[word]),
        block_stride=layout.block_stride_bytes // word, segment_stride=layout.segment_stride_bytes // word,
        num_layers=layout.num_layers, NUM_SEGMENTS=layout.num_segments, SEGMENT_WORDS=segment_words,
        BLOCK=min(triton.next_power_of_2(segment_words), _STEP_BYTES // word), ALIGN=align,
        TO_STAGING=to_staging, num_warps=_NUM_WARPS)


@functools.lru_cache(maxsize=64)
def _layer_table(addresses: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, int]:
    """Device int64 table of the layers' base addresses and the alignment they share (cached per address set)."""
    return torch.tensor(addresses, dtype=torch.int64, device=device), _alignment(*addresses)


def _alignment(*values: int) -> int:
    """The largest of 16, 8, 4, 2, 1 that divides every value."""
    align = 16
    while any(value % align for value in values):
        align //= 2
    return align


def _checked_inputs(layers, block_ids, kind, layout, check_ids) -> tuple[PagedKVLayout, torch.Tensor]:
    if layout is None:
        layout = detect_layout(layers, kind)
    elif len(layers) != layout.num_layers:
        raise ValueError(f"layers: {len(layers)} tensors, but layout describes {layout.num_layers} layers")
    if check_ids:
        check_block_ids(block_ids, layout)
    check_device("block_ids", block_ids, layers[0].device)
    return layout, block_ids.contiguous()


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


def _guess_kind(layer: torch.Tensor) -> str:
    shape = tuple(layer.shape)
    if len(shape) == 3:
        return "mla"
    if len(shape) == 4:
        return "cpu_packed"
    if len(shape) == 5 and (shape[0] == 2) != (shape[1] == 2):
        return "flash_attn" if shape[0] == 2 else "flashinfer"
    known = "; ".join(f"{name} {dims}" for name, dims in LAYOUT_SHAPES.items())
    raise ValueError(f"layers[0]: shape {shape} matches no layout unambiguously; pass kind= (supported: {known})")


def _check_layer(layer: torch.Tensor, kind: str) -> None:
    shape, strides = tuple(layer.shape), layer.stride()
    expected = f"kind={kind!r} expects {LAYOUT_SHAPES[kind]}"
    if (len(shape) != _NDIM[kind] or (kind == "flash_attn" and shape[0] != 2)
            or (kind == "flashinfer" and shape[1] != 2) or (kind == "cpu_packed" and shape[3] % 2)):
        raise ValueError(f"layers[0]: shape {shape}; {expected}")
    if layer.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"layers[0]: dtype {layer.dtype}; expected one of {[str(d) for d in SUPPORTED_DTYPES]}")
    first_inner = 2 if kind == "flash_attn" else 1
    if not _is_row_major(shape[first_inner:], strides[first_inner:]):
        raise ValueError(f"layers[0]: strides {strides} for shape {shape}: the dims after the block dim must be "
                         f"row-major contiguous ({expected})")


def _is_row_major(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _check_disjoint(layout: PagedKVLayout, layer: torch.Tensor) -> None:
    """Raise ValueError if two (block, segment) byte runs of a layer overlap (a scatter would race)."""
    steps = sorted((stride, count) for stride, count in ((layout.block_stride_bytes, layout.num_blocks),
                                                         (layout.segment_stride_bytes, layout.num_segments))
                   if count > 1)
    extent = layout.segment_bytes
    for stride, count in steps:
        if stride < extent:
            raise ValueError(f"layers[0]: strides {layer.stride()} for shape {tuple(layer.shape)} make blocks "
                             f"overlap; expected each block's segments to be disjoint")
        extent += stride * (count - 1)
