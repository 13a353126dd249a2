"""GSA block-sparse decode: config, per-request state, plan/run, offload with prefetch, vLLM adapter.

On plain tensors: :func:`sparse_attention` (one call) or :class:`GSA` (a decode loop: ``plan()`` per step,
``run()`` per layer); :class:`OffloadedGSA` keeps the full KV in pinned host memory with a GPU budget of hot
blocks. ``ucm_sparse.vllm`` plugs GSA into vLLM.
"""
from .config import GSAConfig, SparseConfig
from .gsa import GSA, GSAPlan, sparse_attention
from .offload import OffloadedGSA, OffloadPlan, OffloadStats
from .ops import Selection

__all__ = ["GSA", "GSAConfig", "GSAPlan", "OffloadPlan", "OffloadStats", "OffloadedGSA", "Selection", "SparseConfig",
           "sparse_attention"]
