"""Inputs the attention tests share: a paged KV cache whose unused slots hold NaN (a stray read shows up as NaN in
the output), outputs pre-filled with NaN (a slot a kernel should write and does not stays NaN), and the one table of
tolerances for comparisons against fp32 references."""
import torch

TOLERANCE = {  # a kernel's output in this dtype against a reference computed in fp32
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def make_paged_kv(seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                  block_size: int = 16, spare_blocks: int = 3, spare_columns: int = 1, seed: int = 0,
                  device: torch.device | str = "cpu"):
    """Random queries and a paged cache with shuffled physical blocks.

    Returns ``q`` ``[batch, num_q_heads, head_dim]``, ``key_cache`` and ``value_cache`` ``[num_blocks, block_size,
    num_kv_heads, head_dim]`` (views of one tensor; ``spare_blocks`` blocks no request owns and every slot past a
    request's length hold NaN), ``block_table`` ``[batch, max_blocks + spare_columns]`` int32 (spare columns 0) and
    ``seq_lens`` ``[batch]`` int32, all of ``dtype`` / on ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    kv = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    physical = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(seq_lens), max(blocks_per_seq) + spare_columns, dtype=torch.int32)
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_table[b, :nb] = physical[used:used + nb].int()
        used += nb
        flat = kv[:, block_table[b, :nb].long()].flatten(1, 2)
        flat[:, :n] = torch.randn(2, n, num_kv_heads, head_dim, generator=gen).to(dtype)
        kv[:, block_table[b, :nb].long()] = flat.view(2, nb, block_size, num_kv_heads, head_dim)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    kv, block_table = kv.to(device), block_table.to(device)
    return q.to(device), kv[0], kv[1], block_table, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def poisoned_like(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor like ``tensor`` filled with NaN: an output buffer whose unwritten entries show."""
    return torch.full_like(tensor, float("nan"))
