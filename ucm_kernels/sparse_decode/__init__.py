"""Paged decode attention over per-(request, KV head) block lists (GSA), and our dense decode kernel.

``sparse_decode`` reads only the listed blocks in place through the block table (split-K, flash-decoding);
``dense_decode`` is the same kernel over every block. ``naive.py`` holds the plain-torch reference.
"""
from .triton import dense_decode, sparse_decode

__all__ = ["dense_decode", "sparse_decode"]
