"""bench/flashinfer_peer.py's page lists (plain tensors, no FlashInfer needed): FlashInfer reads exactly the blocks
our kernels read, densely and per (request, KV head) selection."""
import torch

from bench import flashinfer_peer

BLOCK = 16


def test_dense_pages_list_each_requests_blocks_in_order():
    table = torch.tensor([[7, 3, 9, 0], [5, 1, 2, 8]], dtype=torch.int32)
    indptr, indices, last = flashinfer_peer.dense_pages(table, torch.tensor([40, 16]), BLOCK)
    assert indptr.tolist() == [0, 3, 4] and indices.tolist() == [7, 3, 9, 5] and last.tolist() == [8, 16]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


def test_sparse_pages_fold_kv_heads_into_rows_of_a_head_major_cache():
    gen = torch.Generator().manual_seed(0)
    batch, heads, blocks = 2, 3, 6
    table = torch.randperm(batch * blocks, generator=gen).view(batch, blocks).int()
    seq_lens = torch.tensor([90, 70])  # 6 and 5 blocks; last blocks hold 10 and 6 tokens
    sel_idx = torch.tensor([[[0, 2, 5, -1], [0, 4, 5, -1], [0, 1, 3, 5]],
                            [[0, 4, -1, -1], [0, 2, 4, -1], [1, 3, 4, -1]]], dtype=torch.int32)
    sel_count = (sel_idx >= 0).sum(-1).int()
    indptr, indices, last = flashinfer_peer.sparse_pages(table, seq_lens, sel_idx, sel_count, BLOCK)
    expected = [int(table[b, j]) * heads + h for b in range(batch) for h in range(heads)
                for j in sel_idx[b, h].tolist() if j >= 0]
    assert indices.tolist() == expected
    assert indptr.tolist() == [0, 3, 6, 10, 12, 15, 18] and last.tolist() == [10] * 3 + [6] * 3

    cache = torch.randn(batch * blocks, BLOCK, heads, 8, generator=gen)
    pages = flashinfer_peer.head_major(cache)
    assert pages.shape == (batch * blocks * heads, BLOCK, 1, 8)
    for page in (0, 7, 35):
        assert torch.equal(pages[page, :, 0], cache[page // heads, :, page % heads])
