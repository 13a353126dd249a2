"""Test-wide set-up: Triton runs in interpreter mode on CPU, before any kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
