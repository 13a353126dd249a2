"""Triton kernel and launcher of :func:`query_drift`: one program per row, one launch per layer."""
import torch
import triton
import triton.language as tl

from .._launch import Launcher, wait_for_previous_grid
from .._utils import check_device, check_tensor, next_pow2
from .torch import NORM_FLOOR

QUERY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["threshold"])
def _query_drift_kernel(q, kept_q, slots, reselect, fresh, num_heads, head_dim, stride_qn, stride_qh, stride_qd,
                        stride_kn, stride_kh, threshold, NORM_FLOOR: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_D: tl.constexpr, PDL: tl.constexpr = 0):
    wait_for_previous_grid(PDL)
    row = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    inside = (heads[:, None] < num_heads) & (dims[None, :] < head_dim)
    now = tl.load(q + row * stride_qn + heads[:, None] * stride_qh + dims[None, :] * stride_qd, mask=inside,
                  other=0.0)
    kept = kept_q + tl.load(slots + row) * stride_kn + heads[:, None] * stride_kh + dims[None, :]
    then = tl.load(kept, mask=inside, other=0.0).to(tl.float32)
    x = now.to(tl.float32)
    norms = tl.sqrt(tl.sum(x * x, axis=1)) * tl.sqrt(tl.sum(then * then, axis=1))
    similarity = tl.where(norms > NORM_FLOOR, tl.sum(x * then, axis=1) / tl.maximum(norms, NORM_FLOOR), 0.0)
    drift = 1.0 - tl.sum(similarity, axis=0) / num_heads
    selects = (tl.load(reselect + row) != 0) | (drift > threshold)
    tl.store(fresh + row, selects.to(tl.int32))
    tl.store(kept, now.to(kept_q.dtype.element_ty), mask=inside & selects)


_QUERY_DRIFT = Launcher(_query_drift_kernel)


def query_drift(q: torch.Tensor, kept_q: torch.Tensor, slots: torch.Tensor, reselect: torch.Tensor, *,
                threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of :func:`ucm_kernels.query_drift.torch_query_drift` (same contract: ``[n]`` int32 ``fresh``,
    into ``out`` when given, e.g. a CUDA graph's fixed buffer; ``kept_q`` updated in place).

    Args:
        q: ``[n, num_q_heads, head_dim]`` bf16 / fp16 / fp32, any strides.
        kept_q: ``[num_slots + 1, num_q_heads, head_dim]`` q's dtype, contiguous.
        slots: ``[n]`` int64 in ``[0, num_slots]``; reselect: ``[n]`` int32 (nonzero: selects afresh anyway); both,
            and ``out``, contiguous.
        threshold: drift above which a row selects afresh, in (0, 2) (drift is at most 2).
    """
    n = q.shape[0] if isinstance(q, torch.Tensor) else -1
    check_tensor("q", q, 3, QUERY_DTYPES, None, "[n, num_q_heads, head_dim]")
    check_tensor("kept_q", kept_q, 3, (q.dtype,), q.device, f"[num_slots + 1, {q.shape[1]}, {q.shape[2]}]")
    check_tensor("slots", slots, 1, (torch.int64,), q.device, f"[n={n}]")
    check_tensor("reselect", reselect, 1, (torch.int32,), q.device, f"[n={n}]")
    if kept_q.shape[1:] != q.shape[1:] or not kept_q.is_contiguous():
        raise ValueError(f"kept_q: shape {tuple(kept_q.shape)} strides {kept_q.stride()}; expected a contiguous "
                         f"[num_slots + 1, {q.shape[1]}, {q.shape[2]}] like q's heads and dims")
    if slots.shape[0] != n or reselect.shape[0] != n:
        raise ValueError(f"slots / reselect: {slots.shape[0]} / {reselect.shape[0]} rows, q has {n}")
    if not 0.0 < threshold < 2.0:
        raise ValueError(f"threshold: got {threshold!r}, expected a drift in (0, 2)")
    if out is None:
        out = torch.empty(n, dtype=torch.int32, device=q.device)
    elif out.shape != (n,) or out.dtype != torch.int32:
        raise ValueError(f"out: got shape {tuple(out.shape)} dtype {out.dtype}, expected [{n}] int32")
    check_device("out", out, q.device)
    for name, tensor in (("slots", slots), ("reselect", reselect), ("out", out)):
        if n and tensor.stride(0) != 1:
            raise ValueError(f"{name}: stride {tensor.stride(0)}, expected a contiguous [n={n}] tensor")
    if n:
        _QUERY_DRIFT((n,), q, kept_q, slots, reselect, out, q.shape[1], q.shape[2], *q.stride(), kept_q.stride(0),
                     kept_q.stride(1), float(threshold), NORM_FLOOR=NORM_FLOOR, BLOCK_H=next_pow2(q.shape[1]),
                     BLOCK_D=next_pow2(q.shape[2]))
    return out
