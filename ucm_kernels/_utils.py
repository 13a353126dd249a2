"""Helpers shared by the kernel launchers: interpreter detection and launch-setting choice."""
import os

import torch


def triton_interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``), as on CPU-only machines."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless ``tensor`` lives on ``device`` (argument ``name`` is named in the message)."""
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} like the other inputs")
