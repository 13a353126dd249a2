"""Triton kernels of UCM: stateless functions over tensors.

Each op is a folder with ``naive.py`` (the loop or plain-torch reference tests compare against, fp32 math),
``torch.py`` where the op has a CPU path (the vectorised twin, exported as ``torch_<name>``), ``triton.py`` (kernel
+ launcher) and ``__init__.py`` (public entry points). Ops know nothing of the store or of GSA.

Importing this package changes nothing in the process. The kernels take CUDA tensors; on a machine without a GPU
they run in Triton's interpreter only when ``TRITON_INTERPRET=1`` is set before Triton compiles anything (the tests
set it in ``tests/conftest.py``). Without it, the library's CPU paths use torch: the KV block copies fall back to
torch indexing, and ``ucm_sparse`` picks its torch backend for CPU tensors.
"""
