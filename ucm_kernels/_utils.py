"""Helpers shared by the kernel launchers and their callers: interpreter detection, device checks, host-to-device
index tensors."""
import os

import torch


def triton_interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``), as on CPU-only machines."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless ``tensor`` lives on ``device`` (argument ``name`` is named in the message)."""
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} like the other inputs")


def host_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor (e.g. ``[n]`` int64 block ids) copied to ``device`` without waiting for the device: on
    CUDA through page-locked memory, since a copy from pageable memory waits until the stream's earlier work has
    finished, which stalls a host that prepares the next step while the GPU runs this one (as vLLM's does)."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
