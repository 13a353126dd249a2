"""Helpers shared by the kernel launchers and their callers: interpreter detection, argument checks, launch
sizes."""
import os

import torch
import triton.language as tl

INDEX_DTYPES = (torch.int32, torch.int64)  # block ids, tables and lengths the launchers accept
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}  # the dtypes the attention-side dots take


def triton_interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``), as on CPU-only machines."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless ``tensor`` lives on ``device`` (argument ``name`` is named in the message)."""
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} like the other inputs")


def check_positive_int(name: str, value) -> None:
    """Raise ValueError naming argument ``name`` unless ``value`` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: got {value!r}, expected a positive int")


def check_tensor(name: str, tensor, ndim: int, dtypes: tuple, device: torch.device | None, layout: str) -> None:
    """Raise ValueError naming ``name`` unless ``tensor`` is a tensor of ``ndim`` dims in one of ``dtypes`` on
    ``device`` (any device when None); ``layout`` says the expected shape in the message."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != ndim or tensor.dtype not in dtypes:
        got = f"shape {tuple(tensor.shape)} dtype {tensor.dtype}" if isinstance(tensor, torch.Tensor) else repr(tensor)
        raise ValueError(f"{name}: got {got}, expected {layout} in {dtypes}")
    if device is not None:
        check_device(name, tensor, device)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints (plain Python: ``triton.cdiv`` costs about 2 us a host call in Triton 3.6)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (plain Python: launch paths run per decode step)."""
    return 1 << (n - 1).bit_length()


def padded_width(n: int) -> int:
    """``n`` rounded up to a multiple of 16: the row length :func:`padded_empty` allocates."""
    return cdiv(n, 16) * 16


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device, for launch planning; the Triton interpreter (CPU) counts as one."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def padded_empty(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty(*shape)`` as a view of a buffer whose last dimension is rounded up to a multiple of 16, so every
    other stride is a multiple of 16 whatever the last size. A kernel's stride arguments then keep one Triton
    specialisation while a decode grows its tables (a stride crossing a multiple of 16 would compile the kernel
    anew, mid-decode)."""
    *lead, last = shape
    return torch.empty(*lead, padded_width(last), dtype=dtype, device=device)[..., :last]


def evenly_strided_rows(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` (2-D or 3-D) is rows of contiguous entries one row stride apart, its leading dimensions
    taken together (a padded view is; a kernel then walks it as row x stride + entry)."""
    return tensor.stride(-1) == 1 and (tensor.dim() < 3 or tensor.stride(0) == tensor.shape[1] * tensor.stride(1))


def alignment(*values: int) -> int:
    """The largest of 16, 8, 4, 2, 1 that divides every value (addresses and sizes: the widest word a copy can use)."""
    align = 16
    while any(value % align for value in values):
        align //= 2
    return align


def compute_dtype(dtype: torch.dtype):
    """The ``tl`` dtype a kernel's dots run in for inputs of ``dtype`` (one of TL_DTYPES): the same, except fp32
    under the interpreter, whose bf16 dot is wrong."""
    return tl.float32 if triton_interpreting() else TL_DTYPES[dtype]
