"""Triton kernels of UCM: stateless functions over tensors.

Each op is a folder with ``naive.py`` (plain-torch reference, fp32 math), ``triton.py`` (kernel + launcher)
and ``__init__.py`` (public entry points). Ops know nothing of the store or of GSA.
"""
