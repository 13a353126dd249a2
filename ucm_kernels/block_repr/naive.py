"""Loop reference of the block representations: one (block, KV head) at a time, fp32 math, fp8 rounding by search
over every finite e4m3fn value (independent of the bit stepping ``torch.py`` and the kernel use)."""
import math

import torch

FP8 = torch.float8_e4m3fn


def _fp8_values() -> torch.Tensor:
    """Every finite e4m3fn value as fp32, ascending (-0 left out: it equals +0)."""
    values = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    keep = values.isfinite() & ~((values == 0) & values.signbit())
    return values[keep].sort().values


def naive_fp8_scale(keys: torch.Tensor) -> float:
    """The power of two that puts the largest ``|key|`` of ``keys`` (fp32, one block and KV head) in [128, 256), at
    least 2**-126."""
    peak = float(keys.abs().max())
    exponent = math.frexp(peak)[1] - 1 if peak > 0 else -127  # floor(log2(peak)) of a normal fp32
    return 2.0 ** max(exponent - 7, -126)


def naive_to_fp8(values: torch.Tensor, rounding: str) -> torch.Tensor:
    """``values`` (fp32, already divided by the scale) as e4m3fn: the largest value <= each (``"down"``), the
    smallest >= each (``"up"``), or round-to-nearest-even (``"nearest"``). A zero result keeps the sign of its
    value (as the conversion does)."""
    if rounding == "nearest":
        return values.to(FP8)
    grid = _fp8_values()
    picked = [float(grid[grid <= v].max() if rounding == "down" else grid[grid >= v].min()) for v in values.tolist()]
    signed = [math.copysign(0.0, v) if p == 0 else p for p, v in zip(picked, values.tolist())]
    return torch.tensor(signed, dtype=torch.float32).to(FP8)


def naive_update_block_repr(key_cache: torch.Tensor, block_ids: torch.Tensor, kmin: torch.Tensor,
                            kmax: torch.Tensor, kmean: torch.Tensor, kscale: torch.Tensor | None = None) -> None:
    """Reference of :func:`ucm_kernels.block_repr.update_block_repr`, same arguments and semantics (ids outside
    ``[0, num_blocks)`` are skipped)."""
    for block in block_ids.tolist():
        if not 0 <= block < key_cache.shape[0]:
            continue
        for head in range(key_cache.shape[2]):
            keys = key_cache[block, :, head].float().cpu()  # [block_size, head_dim]
            stats = {"down": keys.min(dim=0).values, "up": keys.max(dim=0).values, "nearest": keys.mean(dim=0)}
            scale = naive_fp8_scale(keys)
            if kscale is not None:
                kscale[block, head] = scale
            for target, rounding in ((kmin, "down"), (kmax, "up"), (kmean, "nearest")):
                value = stats[rounding]
                stored = naive_to_fp8(value / scale, rounding) if target.dtype == FP8 else value.to(target.dtype)
                target[block, head] = stored.to(target.device)
