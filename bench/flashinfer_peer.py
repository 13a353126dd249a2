"""FlashInfer's paged decode as the peer of the decode benchmarks (a benchmark-only dependency, never a runtime one).

Two ways to run it over the benchmark's paged cache (``[num_blocks, block_size, num_kv_heads, head_dim]`` K and
V, NHD as vLLM and FlashInfer call it):

* dense: every block of each request, the cache read as is;
* sparse: the per-(request, KV head) block lists GSA selected, heads folded into the batch: each (request, KV
  head) is one row of ``group`` query heads and one KV head, over a head-major copy of the cache whose pages are
  (block, KV head) pairs (page = block * num_kv_heads + head).

Each :class:`PagedDecode` is planned once (as a serving engine plans a step) with fixed index buffers, so its
``run`` can be captured in a CUDA graph.
"""
import torch

WORKSPACE_BYTES = 256 << 20


def available() -> str | None:
    """FlashInfer's version when it imports, else None."""
    try:
        import flashinfer
    except ImportError:
        return None
    return flashinfer.__version__


class PagedDecode:
    """FlashInfer's BatchDecodeWithPagedKVCacheWrapper planned for one page list.

    Args:
        indptr: ``[rows + 1]`` int32 start of each row's pages in ``indices``.
        indices: ``[pages]`` int32 page ids.
        last_page_len: ``[rows]`` int32 tokens in each row's last page.
        num_q_heads, num_kv_heads, head_dim, page_size: per row.
        dtype: q and KV dtype.
        tensor_cores: FlashInfer's tensor-core decode (its prefill kernel) instead of its CUDA-core one.
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, *,
                 num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
                 tensor_cores: bool):
        from flashinfer import BatchDecodeWithPagedKVCacheWrapper

        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=indices.device)
        self.wrapper = BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores, paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last_page_len)
        self._shape = dict(num_qo_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           page_size=page_size, q_data_type=dtype, kv_data_type=dtype)
        self.replan(indptr, indices, last_page_len)

    def replan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor) -> None:
        """Plan a page list of the same row count into the buffers a captured graph reads (as a serving engine
        plans each step; host ``indptr`` / ``last_page_len`` spare FlashInfer a device read)."""
        self.wrapper.plan(indptr, indices, last_page_len, **self._shape)

    def run(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """``[rows, num_q_heads, head_dim]`` attention of ``q`` over ``[pages, page_size, num_kv_heads, head_dim]``
        K and V."""
        return self.wrapper.run(q, (key_cache, value_cache), out=out)


KERNELS = {"flashinfer": False, "flashinfer_tc": True}  # impl name -> use_tensor_cores


def dense_decoders(block_table: torch.Tensor, seq_lens: torch.Tensor, *, num_q_heads: int, num_kv_heads: int,
                   head_dim: int, page_size: int, dtype: torch.dtype) -> dict[str, "PagedDecode"]:
    """{impl: PagedDecode} over every block of each request (``block_table`` ``[batch, max_blocks]``,
    ``seq_lens`` ``[batch]``), one per FlashInfer kernel of :data:`KERNELS`."""
    pages = dense_pages(block_table, seq_lens, page_size)
    return {impl: PagedDecode(*(t.clone() for t in pages), num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, page_size=page_size, dtype=dtype, tensor_cores=tensor_cores)
            for impl, tensor_cores in KERNELS.items()}


def dense_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> tuple[torch.Tensor, ...]:
    """(indptr, indices, last_page_len) listing each request's blocks of ``block_table`` ``[batch, max_blocks]``
    for ``seq_lens`` ``[batch]`` tokens (int32, on the table's device)."""
    blocks = (seq_lens + page_size - 1) // page_size
    listed = torch.arange(block_table.shape[1], device=block_table.device)[None] < blocks[:, None]
    return _page_list(block_table[listed], blocks, seq_lens - (blocks - 1) * page_size)


def sparse_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, sel_idx: torch.Tensor, sel_count: torch.Tensor,
                 page_size: int) -> tuple[torch.Tensor, ...]:
    """(indptr, indices, last_page_len) of the selected blocks, one row per (request, KV head), pages of a
    head-major cache (:func:`head_major`): page = physical block * num_kv_heads + head.

    ``sel_idx`` ``[batch, num_kv_heads, width]`` holds ascending logical blocks (the last one, always selected
    with the local window, is the request's last block), ``sel_count`` ``[batch, num_kv_heads]`` how many."""
    batch, heads, width = sel_idx.shape
    physical = torch.gather(block_table[:, None].expand(batch, heads, -1), 2, sel_idx.clamp(min=0).long())
    pages = physical * heads + torch.arange(heads, device=sel_idx.device)[None, :, None]
    listed = torch.arange(width, device=sel_idx.device)[None, None] < sel_count[..., None]
    blocks = (seq_lens + page_size - 1) // page_size
    last = (seq_lens - (blocks - 1) * page_size).repeat_interleave(heads)
    return _page_list(pages[listed], sel_count.flatten(), last)


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """A copy of ``[num_blocks, block_size, num_kv_heads, head_dim]`` as single-head pages ``[num_blocks *
    num_kv_heads, block_size, 1, head_dim]`` (page = block * num_kv_heads + head)."""
    blocks, size, heads, dim = cache.shape
    return cache.transpose(1, 2).contiguous().view(blocks * heads, size, 1, dim)


def _page_list(indices: torch.Tensor, counts: torch.Tensor, last_page_len: torch.Tensor) -> tuple[torch.Tensor, ...]:
    indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=indices.device)
    indptr[1:] = counts.cumsum(0)
    return indptr, indices.int().contiguous(), last_page_len.int().contiguous()
