"""Triton kernels of UCM: stateless functions over tensors.

Each op is a folder with ``naive.py`` (plain-torch reference, fp32 math), ``triton.py`` (kernel + launcher)
and ``__init__.py`` (public entry points). Ops know nothing of the store or of GSA.
"""
import os

import torch

if not torch.cuda.is_available():  # no GPU: Triton kernels can only run in its interpreter, set before any @jit
    os.environ.setdefault("TRITON_INTERPRET", "1")
