"""Paged decode attention over per-(request, KV head) block lists (GSA), and our dense decode kernel.

``sparse_decode`` reads only the listed blocks in place through the block table (split-K, flash-decoding);
``dense_decode`` is the same kernel over every block. ``naive.py`` holds the loop reference, ``torch.py`` the
vectorised twin (the CPU path: ``torch_sparse_decode``, over ``listed_tokens``).
Per decode step, make a plan once and hand it to every layer (no per-call planning or scratch allocation):

    plan = plan_decode(q, key_cache, max_blocks=sel_idx.shape[2])
    for layer in layers:
        out = sparse_decode(q, k[layer], v[layer], block_table, seq_lens, sel_idx, sel_count, plan=plan)
"""
from .torch import listed_tokens
from .torch import sparse_decode as torch_sparse_decode
from .triton import DecodePlan, dense_decode, plan_decode, sparse_decode

__all__ = ["dense_decode", "sparse_decode", "plan_decode", "DecodePlan", "listed_tokens", "torch_sparse_decode"]
