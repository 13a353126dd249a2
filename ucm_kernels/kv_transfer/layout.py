"""Byte geometry of paged KV caches: where each block's bytes lie, found from a tensor's shape and strides.

A paged KV cache is one tensor per layer. What a block mover needs is not the meaning of each dim but where the
bytes of one block are: one block of one layer must be ``num_segments`` equal runs of ``segment_bytes``
contiguous bytes (1 run in most layouts; 2 when K and V of all blocks are separate planes, as in vLLM's classic
FlashAttention layout), evenly spaced. Any layout of that kind moves as opaque bytes, whatever order its inner
dims are stored in (e.g. vLLM 0.26's FlashAttention view ``(num_blocks, heads, block_size, 2 * head_size)``
whose storage is ``(num_blocks, block_size, heads, 2 * head_size)``); any other is refused with its shape and
strides, never mistaken for another.

The block dim is named by ``kind`` (the layouts of :data:`LAYOUT_SHAPES`, whose dims after the block dim must
then be row-major: a name promises what the dims mean), found as the one dim of ``num_blocks`` entries (any
order inside a block: the bytes are opaque), or guessed from the shape.
"""
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LAYOUT_SHAPES = {
    "flash_attn": "(2, num_blocks, block_size, num_kv_heads, head_dim)",
    "flashinfer": "(num_blocks, 2, block_size, num_kv_heads, head_dim)",
    "mla": "(num_blocks, block_size, head_dim)",
    "cpu_packed": "(num_blocks, num_kv_heads, block_size, 2 * head_size)",
}
OPAQUE = "opaque"  # the kind of a layout found from num_blocks and strides alone
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
                    torch.uint8, torch.int8)
_NDIM = {"flash_attn": 5, "flashinfer": 5, "mla": 3, "cpu_packed": 4}


@dataclass(frozen=True)
class PagedKVLayout:
    """Byte geometry of a paged KV cache: ``num_layers`` tensors of ``num_blocks`` blocks each; one block of
    one layer is ``num_segments`` contiguous runs of ``segment_bytes`` (2 for flash_attn: K and V)."""

    kind: str  # a key of LAYOUT_SHAPES, or OPAQUE
    num_layers: int
    num_blocks: int
    num_segments: int
    segment_bytes: int
    block_stride_bytes: int  # from one block of a layer to the next
    segment_stride_bytes: int  # from one segment of a block to the next (K to V); 0 when num_segments == 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one block across all layers: one staging row."""
        return self.num_layers * self.num_segments * self.segment_bytes

    def staging_shape(self, n_ids: int) -> tuple[int, int, int, int]:
        """Shape of the uint8 staging rows for ``n_ids`` block ids."""
        return (n_ids, self.num_layers, self.num_segments, self.segment_bytes)


def detect_layout(layers: Sequence[torch.Tensor], kind: str | None = None, *,
                  num_blocks: int | None = None) -> PagedKVLayout:
    """Check per-layer paged caches and describe where each block's bytes lie.

    Args:
        layers: one tensor per layer, all of the same shape, strides, dtype (SUPPORTED_DTYPES) and device.
        kind: a key of LAYOUT_SHAPES: the block dim is where that layout has it.
        num_blocks: the number of blocks (vLLM's ``kv_cache_config.num_blocks``): the block dim is the one dim
            of that size, whatever the layout; the result's kind is ``OPAQUE``. Used when ``kind`` is None.
        With neither, the kind is guessed from the shape (raises if the shape is ambiguous).
    Returns:
        The :class:`PagedKVLayout`; raises ValueError naming the shape, the strides and what is wrong when a
        block of a layer is not ``num_segments`` evenly spaced contiguous runs.
    """
    if len(layers) == 0:
        raise ValueError("layers: got an empty sequence, expected one paged cache tensor per layer")
    first = layers[0]
    _check_same(layers)
    if first.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"layers[0]: dtype {first.dtype}; expected one of {[str(d) for d in SUPPORTED_DTYPES]}")
    if kind is None and num_blocks is not None:
        kind, block_dim = OPAQUE, _block_dim_of_size(first, num_blocks)
    else:
        kind = _guess_kind(first) if kind is None else kind
        block_dim = _named_block_dim(first, kind)
    return _geometry(first, block_dim, kind, len(layers))


def _check_row_major(layer: torch.Tensor, kind: str, block_dim: int) -> None:
    """A named layout promises what its dims mean: those after the block dim must be row-major contiguous."""
    expected = 1
    for size, stride in zip(reversed(layer.shape[block_dim + 1:]), reversed(layer.stride()[block_dim + 1:])):
        if size != 1 and stride != expected:
            raise ValueError(f"layers[0]: strides {layer.stride()} for shape {tuple(layer.shape)}: the dims after the "
                             f"block dim must be row-major contiguous (kind={kind!r} expects {LAYOUT_SHAPES[kind]}); "
                             f"pass num_blocks= to move any layout whose blocks are contiguous runs")
        expected *= size


def block_segments(layer: torch.Tensor, layout: PagedKVLayout) -> torch.Tensor:
    """uint8 ``[num_blocks, num_segments, segment_bytes]`` view of one layer's paged cache (writes go through)."""
    view = torch.empty(0, dtype=torch.uint8, device=layer.device)
    return view.set_(layer.untyped_storage(), layer.storage_offset() * layer.element_size(),
                     (layout.num_blocks, layout.num_segments, layout.segment_bytes),
                     (layout.block_stride_bytes, layout.segment_stride_bytes, 1))


def _check_same(layers: Sequence[torch.Tensor]) -> None:
    first = layers[0]
    for i, layer in enumerate(layers[1:], start=1):
        if (layer.shape, layer.stride(), layer.dtype, layer.device) != (first.shape, first.stride(), first.dtype,
                                                                        first.device):
            raise ValueError(f"layers[{i}]: shape {tuple(layer.shape)}, strides {layer.stride()}, {layer.dtype} on "
                             f"{layer.device}; expected the same as layers[0]: shape {tuple(first.shape)}, strides "
                             f"{first.stride()}, {first.dtype} on {first.device}")


def _guess_kind(layer: torch.Tensor) -> str:
    shape = tuple(layer.shape)
    if len(shape) == 3:
        return "mla"
    if len(shape) == 4:
        return "cpu_packed"
    if len(shape) == 5 and (shape[0] == 2) != (shape[1] == 2):
        return "flash_attn" if shape[0] == 2 else "flashinfer"
    known = "; ".join(f"{name} {dims}" for name, dims in LAYOUT_SHAPES.items())
    raise ValueError(f"layers[0]: shape {shape} matches no layout unambiguously; pass kind= or num_blocks= "
                     f"(named layouts: {known})")


def _named_block_dim(layer: torch.Tensor, kind: str) -> int:
    """The block dim of layout ``kind``, after checking the shape fits it."""
    if kind not in LAYOUT_SHAPES:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(LAYOUT_SHAPES)}")
    shape = tuple(layer.shape)
    if (len(shape) != _NDIM[kind] or (kind == "flash_attn" and shape[0] != 2)
            or (kind == "flashinfer" and shape[1] != 2) or (kind == "cpu_packed" and shape[3] % 2)):
        raise ValueError(f"layers[0]: shape {shape}; kind={kind!r} expects {LAYOUT_SHAPES[kind]}")
    block_dim = 1 if kind == "flash_attn" else 0
    _check_row_major(layer, kind, block_dim)
    return block_dim


def _block_dim_of_size(layer: torch.Tensor, num_blocks: int) -> int:
    """The one dim of ``num_blocks`` entries whose other dims make a movable block (see the module docstring)."""
    shape, strides = tuple(layer.shape), layer.stride()
    movable = []
    for dim in (d for d, size in enumerate(shape) if size == num_blocks):
        try:
            _segments(shape, strides, dim)
            movable.append(dim)
        except ValueError:
            pass
    if len(movable) != 1:
        found = "no dim" if not movable else f"dims {movable}"
        raise ValueError(f"layers[0]: shape {shape}, strides {strides}: {found} of num_blocks={num_blocks} entries "
                         f"whose blocks are evenly spaced contiguous byte runs; UCM cannot move this layout")
    return movable[0]


def _segments(shape: tuple[int, ...], strides: tuple[int, ...], block_dim: int) -> tuple[int, int, int]:
    """``(elements per segment, segments per block, segment stride)`` of blocks along ``block_dim``.

    The dims strided finer than the block dim must tile one dense run; at most one dim may be strided wider
    (its entries are the segments, e.g. K and V planes). Raises ValueError otherwise.
    """
    block_stride = strides[block_dim]
    if block_stride == 0 and shape[block_dim] > 1:
        raise ValueError("blocks overlap (block stride 0)")
    others = [(strides[d], shape[d]) for d in range(len(shape)) if d != block_dim and shape[d] > 1]
    inner = sorted(pair for pair in others if pair[0] < block_stride)
    outer = [pair for pair in others if pair[0] >= block_stride]
    run = 1
    for stride, size in inner:
        if stride != run:
            raise ValueError(f"the dims inside a block do not tile one contiguous run (stride {stride}, expected "
                             f"{run})")
        run *= size
    if len(outer) > 1:
        raise ValueError(f"{len(outer)} dims are strided wider than the block dim; at most 1 (K/V planes) moves")
    count, stride = outer[0][::-1] if outer else (1, 0)
    return run, count, stride


def _geometry(layer: torch.Tensor, block_dim: int, kind: str, num_layers: int) -> PagedKVLayout:
    shape, strides, itemsize = tuple(layer.shape), layer.stride(), layer.element_size()
    try:
        run, count, segment_stride = _segments(shape, strides, block_dim)
    except ValueError as error:
        raise ValueError(f"layers[0]: shape {shape}, strides {strides} ({kind}, block dim {block_dim}): {error}; "
                         f"UCM cannot move this layout") from None
    layout = PagedKVLayout(kind=kind, num_layers=num_layers, num_blocks=shape[block_dim], num_segments=count,
                           segment_bytes=run * itemsize, block_stride_bytes=strides[block_dim] * itemsize,
                           segment_stride_bytes=segment_stride * itemsize)
    _check_disjoint(layout, layer)
    return layout


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

