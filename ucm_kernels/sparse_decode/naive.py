"""Plain-torch reference of paged decode attention over per-(request, KV head) block lists (fp32 math)."""
import torch


def naive_sparse_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, sel_idx: torch.Tensor,
                        sel_count: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attend each (request, KV head) over the logical blocks in its list (fp32 math and result).

    q ``[batch, num_q_heads, head_dim]``; key_cache / value_cache ``[num_blocks, block_size, num_kv_heads,
    head_dim]``; block_table ``[batch, max_blocks_per_seq]``; seq_lens ``[batch]``; sel_idx ``[batch,
    num_kv_heads, max_sel]`` logical block indices; sel_count ``[batch, num_kv_heads]``. Returns fp32
    ``[batch, num_q_heads, head_dim]``. Query head ``i`` uses KV head ``i // (num_q_heads // num_kv_heads)``;
    tokens at or past ``seq_lens[b]`` and entries outside ``[0, ceil(seq_len / block_size))`` are left out of the
    math; an empty list gives zeros.
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    offsets = torch.arange(block_size, device=q.device)
    for b in range(batch):
        for h in range(num_kv_heads):
            logical = sel_idx[b, h, :int(sel_count[b, h])].long()
            logical = logical[(logical >= 0) & (logical * block_size < int(seq_lens[b]))]  # others are ignored
            if logical.numel() == 0:
                continue
            physical = block_table[b, logical].long()
            live = ((logical[:, None] * block_size + offsets) < int(seq_lens[b])).reshape(-1)
            keys = key_cache[physical, :, h].float().reshape(-1, head_dim)[live]
            values = value_cache[physical, :, h].float().reshape(-1, head_dim)[live]
            scores = (q[b, h * group:(h + 1) * group].float() @ keys.T) * scale
            out[b, h * group:(h + 1) * group] = torch.softmax(scores, dim=-1) @ values
    return out


def naive_dense_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`naive_sparse_decode` over every logical block of each request (fp32 result)."""
    sel_idx, sel_count = full_block_lists(seq_lens, key_cache.shape[2], key_cache.shape[1])
    return naive_sparse_decode(q, key_cache, value_cache, block_table, seq_lens, sel_idx, sel_count, scale)


def full_block_lists(seq_lens: torch.Tensor, num_kv_heads: int, block_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists naming every logical block: sel_idx ``[batch, num_kv_heads, max_nb]`` int32 (-1 padded) and
    sel_count ``[batch, num_kv_heads]`` int32."""
    counts = (seq_lens.long() + block_size - 1) // block_size
    width = int(counts.max()) if counts.numel() else 0
    logical = torch.arange(width, device=seq_lens.device).expand(len(seq_lens), width)
    sel_idx = torch.where(logical < counts[:, None], logical, -1).int()
    sel_idx = sel_idx[:, None, :].expand(-1, num_kv_heads, -1).contiguous()
    sel_count = counts.int()[:, None].expand(-1, num_kv_heads).contiguous()
    return sel_idx, sel_count
