"""Triton kernel and launcher of the block representations: per block and KV head, min/max/mean key."""
import torch
import triton
import triton.language as tl

from .._utils import check_device, triton_interpreting

REPR_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _block_repr_kernel(
    key_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    ids_ptr,  # [num_ids] int32/int64 physical block ids, out-of-range entries (-1) skipped
    kmin_ptr, kmax_ptr, kmean_ptr,  # [num_blocks, num_kv_heads, head_dim], same strides
    num_blocks,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_rb, stride_rh, stride_rd,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    block = tl.load(ids_ptr + i).to(tl.int64)
    if (block < 0) | (block >= num_blocks):
        return
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t[:, None] < BLOCK_SIZE) & (d[None, :] < HEAD_DIM)
    src = key_ptr + block * stride_kb + head * stride_kh + t[:, None] * stride_kt + d[None, :] * stride_kd
    keys = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, keys, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, keys, float("-inf")), axis=0)
    mean = tl.sum(keys, axis=0) / BLOCK_SIZE
    dst = block * stride_rb + head * stride_rh + d * stride_rd
    tl.store(kmin_ptr + dst, lo.to(kmin_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(kmax_ptr + dst, hi.to(kmax_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(kmean_ptr + dst, mean.to(kmean_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _check_inputs(key_cache: torch.Tensor, block_ids: torch.Tensor, reprs: dict) -> None:
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


def update_block_repr(key_cache: torch.Tensor, block_ids: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                      kmean: torch.Tensor) -> None:
    """Compute in place the representation of each physical block in ``block_ids`` from its ``block_size`` keys.

    Args:
        key_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` bf16/fp16/fp32, any strides (e.g. ``kv[0]``).
        block_ids: ``[num_ids]`` int32/int64 physical block ids; entries outside ``[0, num_blocks)`` (the
            padding value -1) are skipped. Pass only blocks that became full (see ``blocks_filled``).
        kmin, kmax, kmean: ``[num_blocks, num_kv_heads, head_dim]``, bf16/fp16/fp32, identical strides, written
            in place at the listed blocks only: per-channel min, max and mean of the block's keys (fp32 math,
            rounded once to the repr dtype; min and max are exact).
    """
    _check_inputs(key_cache, block_ids, {"kmin": kmin, "kmax": kmax, "kmean": kmean})
    num_blocks, block_size, heads, head_dim = key_cache.shape
    if block_ids.numel() == 0:
        return
    _block_repr_kernel[(block_ids.numel(), heads)](
        key_ptr=key_cache, ids_ptr=block_ids, kmin_ptr=kmin, kmax_ptr=kmax, kmean_ptr=kmean,
        num_blocks=num_blocks,
        stride_kb=key_cache.stride(0), stride_kt=key_cache.stride(1), stride_kh=key_cache.stride(2),
        stride_kd=key_cache.stride(3),
        stride_rb=kmin.stride(0), stride_rh=kmin.stride(1), stride_rd=kmin.stride(2),
        BLOCK_SIZE=block_size, BLOCK_T=triton.next_power_of_2(block_size), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
