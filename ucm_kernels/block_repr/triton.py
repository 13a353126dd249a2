"""Triton kernel and launcher of the block representations: per block and KV head, min/max/mean key.

fp8 (e4m3fn) reprs hold ``repr / kscale`` with a power-of-two ``kscale`` per (block, KV head) that puts the
block's largest ``|key|`` in [128, 256): any finite key fits (e4m3fn has no inf and tops out at 448), and
no value is subnormal at the top of the block's range. kmin is rounded toward -inf and kmax toward +inf
(so ``kmin * kscale <= min`` and ``kmax * kscale >= max`` exactly: the Quest score stays an upper bound), the
mean to nearest-even. The bit patterns are built with integer arithmetic: a float -> fp8 conversion rounds
one way only, and Triton's interpreter rounds differently from the GPU.
"""
import torch
import triton
import triton.language as tl

from .._launch import Launcher, wait_for_previous_grid
from .._utils import check_device, next_pow2, triton_interpreting

FP8 = torch.float8_e4m3fn
REPR_DTYPES = (torch.bfloat16, torch.float16, torch.float32, FP8)
CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _pow2(exponent):
    """2.0 ** exponent as fp32, for integer exponents in [-126, 127]."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fp8_bits(x, scale, inv_scale, ROUND: tl.constexpr):
    """e4m3fn bit patterns (uint8) of ``x / scale`` (power-of-two scale, ``|x / scale| < 256``), rounded down
    (ROUND -1), to nearest-even (0) or up (+1)."""
    bits = x.to(tl.int32, bitcast=True)
    negative = bits < 0  # the sign bit: -0.0 stays -0
    magnitude = tl.abs(x * inv_scale)
    binade = tl.maximum(((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # -6: subnormals
    steps = magnitude * _pow2(3 - binade)  # in [0, 16): the value in fp8 steps of 2**(binade - 3), exact
    whole = steps.to(tl.int32)
    if ROUND == 0:
        half = steps - whole.to(tl.float32)
        away = (half > 0.5) | ((half == 0.5) & ((whole & 1) == 1))
    else:  # away from zero when inexact: negatives rounding down, positives rounding up
        # tested unscaled, where the truncated value times the scale is exact even if x / scale underflowed
        inexact = whole.to(tl.float32) * _pow2(binade - 3) * scale != tl.abs(x)
        away = inexact & (negative ^ (ROUND > 0))
    code = (binade + 6) * 8 + whole + away.to(tl.int32)  # a carry out of the mantissa moves to the next binade
    return (code | tl.where(negative, 0x80, 0)).to(tl.uint8)


@triton.jit
def _store_repr(ptr, offsets, mask, values, scale, inv_scale, ROUND: tl.constexpr):
    """Store ``values`` in the repr's dtype: fp8 scaled and rounded per ROUND, others rounded to nearest."""
    if ptr.dtype.element_ty == tl.float8e4nv:
        tl.store(ptr + offsets, _fp8_bits(values, scale, inv_scale, ROUND).to(tl.float8e4nv, bitcast=True),
                 mask=mask)
    else:
        tl.store(ptr + offsets, values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _write_block_repr(key_ptr, block, head, kmin_ptr, kmax_ptr, kmean_ptr, kscale_ptr,
                      stride_kb, stride_kt, stride_kh, stride_kd, stride_rb, stride_rh, stride_rd, stride_sb, stride_sh,
                      BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      SCALED: tl.constexpr):
    """Min, max and mean key of one (physical block, KV head), written to the reprs (and kscale if SCALED)."""
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    mask = (t[:, None] < BLOCK_SIZE) & d_ok[None, :]
    src = key_ptr + block * stride_kb + head * stride_kh + t[:, None] * stride_kt + d[None, :] * stride_kd
    keys = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, keys, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, keys, float("-inf")), axis=0)
    mean = tl.sum(keys, axis=0) / BLOCK_SIZE
    scale = 1.0
    inv_scale = 1.0
    if SCALED:
        peak = tl.max(tl.where(d_ok, tl.maximum(-lo, hi), 0.0), axis=0)  # largest |key|
        exponent = tl.maximum(((peak.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 7, -126)
        scale = _pow2(exponent)
        inv_scale = _pow2(-exponent)
        tl.store(kscale_ptr + block * stride_sb + head * stride_sh, scale)
    dst = block * stride_rb + head * stride_rh + d * stride_rd
    _store_repr(kmin_ptr, dst, d_ok, lo, scale, inv_scale, ROUND=-1)  # down
    _store_repr(kmax_ptr, dst, d_ok, hi, scale, inv_scale, ROUND=1)  # up
    _store_repr(kmean_ptr, dst, d_ok, mean, scale, inv_scale, ROUND=0)  # nearest-even


@triton.jit
def _block_repr_kernel(
    key_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    ids_ptr,  # [num_ids] int32/int64 physical block ids, out-of-range entries (-1) skipped
    kmin_ptr, kmax_ptr, kmean_ptr,  # [num_blocks, num_kv_heads, head_dim], same strides
    kscale_ptr,  # [num_blocks, num_kv_heads] fp32 (written if SCALED; any pointer otherwise)
    num_blocks,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_rb, stride_rh, stride_rd,
    stride_sb, stride_sh,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr, PDL: tl.constexpr = 0,
):
    wait_for_previous_grid(PDL)
    i = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    block = tl.load(ids_ptr + i).to(tl.int64)
    if (block >= 0) & (block < num_blocks):
        _write_block_repr(key_ptr, block, head, kmin_ptr, kmax_ptr, kmean_ptr, kscale_ptr, stride_kb, stride_kt,
                          stride_kh, stride_kd, stride_rb, stride_rh, stride_rd, stride_sb, stride_sh,
                          BLOCK_SIZE, BLOCK_T, HEAD_DIM, BLOCK_D, SCALED)


@triton.jit
def _block_repr_ranges_kernel(
    key_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_rows, max_blocks] int32/int64 logical -> physical block id
    first_ptr, end_ptr,  # [num_rows] int32/int64: each row's logical blocks [first, end) are written
    kmin_ptr, kmax_ptr, kmean_ptr, kscale_ptr,
    num_rows, num_blocks, max_blocks,
    stride_btr, stride_btj,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_rb, stride_rh, stride_rd,
    stride_sb, stride_sh,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SCALED: tl.constexpr, PDL: tl.constexpr = 0,
):
    """Programs stride over each row's range, starting at a row-dependent program so that rows of one block each
    (decode steps) spread over the programs."""
    wait_for_previous_grid(PDL)
    p = tl.program_id(0)
    programs = tl.num_programs(0)
    head = tl.program_id(1).to(tl.int64)
    for row in range(0, num_rows):
        first = tl.maximum(tl.load(first_ptr + row).to(tl.int32), 0)
        end = tl.minimum(tl.load(end_ptr + row).to(tl.int32), max_blocks)
        start = first + (p - row % programs + programs) % programs
        for j in range(start, end, programs):
            block = tl.load(block_table_ptr + row * stride_btr + j * stride_btj).to(tl.int64)
            if (block >= 0) & (block < num_blocks):
                _write_block_repr(key_ptr, block, head, kmin_ptr, kmax_ptr, kmean_ptr, kscale_ptr, stride_kb,
                                  stride_kt, stride_kh, stride_kd, stride_rb, stride_rh, stride_rd, stride_sb,
                                  stride_sh, BLOCK_SIZE, BLOCK_T, HEAD_DIM, BLOCK_D, SCALED)


def _check_inputs(key_cache: torch.Tensor, block_ids: torch.Tensor, reprs: dict, kscale) -> None:
    if key_cache.dim() != 4 or key_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"key_cache: got shape {tuple(key_cache.shape)} dtype {key_cache.dtype}, expected "
                         f"[num_blocks, block_size, num_kv_heads, head_dim] in {CACHE_DTYPES}")
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ids: got shape {tuple(block_ids.shape)} dtype {block_ids.dtype}, "
                         "expected a 1-D int32 or int64 tensor")
    if not key_cache.is_cuda and not triton_interpreting():
        raise ValueError(f"key_cache is on {key_cache.device}: the kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    check_device("block_ids", block_ids, key_cache.device)
    num_blocks, _, heads, head_dim = key_cache.shape
    for name, repr_ in reprs.items():
        if tuple(repr_.shape) != (num_blocks, heads, head_dim) or repr_.dtype not in REPR_DTYPES:
            raise ValueError(f"{name}: got shape {tuple(repr_.shape)} dtype {repr_.dtype}, expected "
                             f"{(num_blocks, heads, head_dim)} (key_cache's [num_blocks, num_kv_heads, head_dim]) "
                             f"in {REPR_DTYPES}")
        check_device(name, repr_, key_cache.device)
        if repr_.stride() != reprs["kmin"].stride():
            raise ValueError(f"{name}: strides {repr_.stride()} differ from kmin's {reprs['kmin'].stride()}; "
                             "allocate kmin, kmax and kmean alike")
    check_kscale(kscale, reprs, (num_blocks, heads), key_cache.device)


def check_kscale(kscale, reprs: dict, shape: tuple, device: torch.device) -> None:
    """kscale must be a ``shape`` fp32 tensor on ``device`` when any of ``reprs`` is fp8 (else None or such)."""
    fp8 = [name for name, repr_ in reprs.items() if repr_.dtype == FP8]
    if kscale is None:
        if fp8:
            raise ValueError(f"kscale: got None, but {fp8} are {FP8}: pass the [num_blocks, num_kv_heads] fp32 "
                             "scales (empty_block_repr allocates them)")
        return
    if not isinstance(kscale, torch.Tensor) or tuple(kscale.shape) != shape or kscale.dtype != torch.float32:
        got = f"shape {tuple(kscale.shape)} dtype {kscale.dtype}" if isinstance(kscale, torch.Tensor) else repr(kscale)
        raise ValueError(f"kscale: got {got}, expected {shape} ([num_blocks, num_kv_heads]) torch.float32")
    check_device("kscale", kscale, device)


_BY_IDS, _BY_RANGES = Launcher(_block_repr_kernel), Launcher(_block_repr_ranges_kernel)


def update_block_repr(key_cache: torch.Tensor, block_ids: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                      kmean: torch.Tensor, kscale: torch.Tensor | None = None) -> None:
    """Compute in place the representation of each physical block in ``block_ids`` from its ``block_size`` keys.

    Args:
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` bf16/fp16/fp32, any strides (e.g. ``kv[0]``).
        block_ids: ``[num_ids]`` int32/int64 physical block ids; entries outside ``[0, num_blocks)`` (the
            padding value -1) are skipped. Pass only blocks that became full (see ``blocks_filled``).
        kmin, kmax, kmean: ``[num_blocks, num_kv_heads, head_dim]``, bf16/fp16/fp32/float8_e4m3fn, identical
            strides, written in place at the listed blocks only: per-channel min, max and mean of the block's keys
            (fp32 math, rounded once to the repr dtype; min and max are exact in the cache dtype or wider). fp8
            reprs hold the values divided by ``kscale``, kmin rounded down, kmax up, kmean to nearest-even.
        kscale: ``[num_blocks, num_kv_heads]`` fp32, any strides; required when any repr is fp8, written in place
            at the listed blocks when given: the power of two that puts the block's largest ``|key|`` in
            [128, 256) (the value of an fp8 repr is ``repr.float() * kscale[..., None]``). Keys must be finite.
    """
    _check_inputs(key_cache, block_ids, {"kmin": kmin, "kmax": kmax, "kmean": kmean}, kscale)
    num_blocks, _, heads, _ = key_cache.shape
    if block_ids.numel() == 0:
        return
    _BY_IDS((block_ids.numel(), heads),
        key_ptr=key_cache, ids_ptr=block_ids, num_blocks=num_blocks,
        **_repr_launch_args(key_cache, kmin, kmax, kmean, kscale))


def update_block_repr_ranges(key_cache: torch.Tensor, block_table: torch.Tensor, first: torch.Tensor,
                             end: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor,
                             kscale: torch.Tensor | None = None, *, programs: int = 128) -> None:
    """:func:`update_block_repr` for the logical blocks ``[first[r], end[r])`` of each block-table row ``r``.

    The ranges are read on the device (no host sync, a fixed launch): one call per layer covers the blocks a step
    filled and those a request brought along (prefix-cache hits, connector loads), and captures into a CUDA graph
    whose replays see new ranges. Ranges are clamped to ``[0, max_blocks)``; an empty range costs two loads.

    Args:
        key_cache, kmin, kmax, kmean, kscale: as in :func:`update_block_repr`.
        block_table: ``[num_rows, max_blocks]`` int32/int64 logical -> physical block id (out-of-range ids skipped).
        first, end: ``[num_rows]`` int32/int64 on the cache's device.
        programs: programs per KV head; they stride over each range.
    """
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table: got shape {tuple(block_table.shape)} dtype {block_table.dtype}, expected an "
                         "int32/int64 [num_rows, max_blocks] tensor")
    rows = block_table.shape[0]
    for name, bound in (("first", first), ("end", end)):
        if tuple(bound.shape) != (rows,) or bound.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: got shape {tuple(bound.shape)} dtype {bound.dtype}, expected an int32/int64 "
                             f"[{rows}] tensor (one entry per block_table row)")
    _check_inputs(key_cache, first, {"kmin": kmin, "kmax": kmax, "kmean": kmean}, kscale)
    for name, tensor in (("end", end), ("block_table", block_table)):
        check_device(name, tensor, key_cache.device)
    if isinstance(programs, bool) or not isinstance(programs, int) or programs < 1:
        raise ValueError(f"programs: got {programs!r}, expected an int >= 1")
    if rows == 0:
        return
    _BY_RANGES((programs, key_cache.shape[2]),
        key_ptr=key_cache, block_table_ptr=block_table, first_ptr=first, end_ptr=end, num_rows=rows,
        num_blocks=key_cache.shape[0], max_blocks=block_table.shape[1], stride_btr=block_table.stride(0),
        stride_btj=block_table.stride(1), **_repr_launch_args(key_cache, kmin, kmax, kmean, kscale))


def _repr_launch_args(key_cache: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, kmean: torch.Tensor,
                      kscale: torch.Tensor | None) -> dict:
    """The cache, repr and scale arguments both repr kernels take."""
    _, block_size, _, head_dim = key_cache.shape
    return dict(
        kmin_ptr=kmin, kmax_ptr=kmax, kmean_ptr=kmean, kscale_ptr=kmin if kscale is None else kscale,
        stride_kb=key_cache.stride(0), stride_kt=key_cache.stride(1), stride_kh=key_cache.stride(2),
        stride_kd=key_cache.stride(3),
        stride_rb=kmin.stride(0), stride_rh=kmin.stride(1), stride_rd=kmin.stride(2),
        stride_sb=0 if kscale is None else kscale.stride(0), stride_sh=0 if kscale is None else kscale.stride(1),
        BLOCK_SIZE=block_size, BLOCK_T=next_pow2(block_size), HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim), SCALED=kscale is not None,
    )
