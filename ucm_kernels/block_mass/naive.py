"""Loop reference of :func:`ucm_kernels.block_mass.block_lse2`, for tests (any device, fp32 math)."""
import math

import torch


def naive_block_lse2(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     sel_idx: torch.Tensor, sel_count: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """:func:`~ucm_kernels.block_mass.block_lse2`'s result, one (request, KV head, entry) at a time."""
    batch, num_q_heads, head_dim = q.shape
    block_size, heads = key_cache.shape[1], key_cache.shape[2]
    group, width = num_q_heads // heads, sel_idx.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.full((batch, heads, group, width), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        seq_len = int(seq_lens[b])
        for h in range(heads):
            for entry in range(min(int(sel_count[b, h]), width)):
                logical = int(sel_idx[b, h, entry])
                if logical < 0 or logical * block_size >= seq_len:
                    continue
                tokens = min(block_size, seq_len - logical * block_size)
                keys = key_cache[int(block_table[b, logical]), :tokens, h].float()
                logits = q[b, h * group:(h + 1) * group].float() @ keys.T * (scale * math.log2(math.e))
                out[b, h, :, entry] = torch.logsumexp(logits * math.log(2), dim=-1) / math.log(2)
    return out
