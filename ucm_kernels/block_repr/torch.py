"""Vectorised plain-torch block representations (fp32 math): the CPU path, same contract as the kernel.

fp8 reprs take the direct route: convert (round to nearest), compare the result back in fp32 and step one fp8
code outward where it went the wrong way. ``naive.py`` is the loop reference both are tested against.
"""
import torch

FP8 = torch.float8_e4m3fn


def fp8_scale(keys: torch.Tensor) -> torch.Tensor:
    """``[n, num_kv_heads]`` fp32 powers of two putting each block's largest ``|key|`` in [128, 256) (at least
    2**-126), from fp32 keys ``[n, block_size, num_kv_heads, head_dim]``."""
    peak = keys.abs().amax(dim=(1, 3))
    exponent = ((peak.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2(peak)); -127 for 0 and subnormals
    return (((exponent - 7).clamp(min=-126) + 127) << 23).view(torch.float32)  # the power of two, bit for bit


def _step_up(bits: torch.Tensor) -> torch.Tensor:
    """The next larger e4m3fn value's bits (int16 of uint8 patterns; -0 steps to the smallest positive)."""
    return torch.where(bits == 0x80, 0x01, torch.where(bits > 0x80, bits - 1, bits + 1))


def _step_down(bits: torch.Tensor) -> torch.Tensor:
    """The next smaller e4m3fn value's bits (+0 steps to the smallest negative)."""
    return torch.where(bits == 0x00, 0x81, torch.where(bits >= 0x80, bits + 1, bits - 1))


def to_fp8(values: torch.Tensor, scale: torch.Tensor, rounding: str) -> torch.Tensor:
    """``values / scale[..., None]`` as e4m3fn rounded ``"down"``, ``"up"`` or to ``"nearest"``-even.

    Args:
        values: ``[..., head_dim]`` fp32; scale: ``[...]`` fp32 powers of two with ``|values / scale| < 256``.
    """
    scale = scale[..., None]
    nearest = (values / scale).to(FP8)
    if rounding == "nearest":
        return nearest
    back = nearest.float() * scale
    bits = nearest.view(torch.uint8).to(torch.int16)
    if rounding == "up":
        bits = torch.where(back < values, _step_up(bits), bits)
    else:
        bits = torch.where(back > values, _step_down(bits), bits)
    return bits.to(torch.uint8).view(FP8)


def update_block_repr(key_cache: torch.Tensor, block_ids: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                      kmean: torch.Tensor, kscale: torch.Tensor | None = None) -> None:
    """:func:`ucm_kernels.block_repr.update_block_repr` in torch ops, same arguments and semantics."""
    ids = block_ids.long()
    ids = ids[(ids >= 0) & (ids < key_cache.shape[0])]
    keys = key_cache[ids].float()  # [n, block_size, num_kv_heads, head_dim]
    scale = fp8_scale(keys)
    if kscale is not None:
        kscale[ids] = scale
    for repr_, values, rounding in ((kmin, keys.amin(dim=1), "down"), (kmax, keys.amax(dim=1), "up"),
                                    (kmean, keys.mean(dim=1), "nearest")):
        repr_[ids] = to_fp8(values, scale, rounding) if repr_.dtype == FP8 else values.to(repr_.dtype)
