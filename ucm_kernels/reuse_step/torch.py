"""Vectorised torch twin of :func:`reuse_step` (any device; the CPU path)."""
import torch


def reuse_step(seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor, seq_len_state: torch.Tensor,
               tail_state: torch.Tensor, age_state: torch.Tensor, *, block_size: int, every: int, num_slots: int,
               same_width: bool) -> torch.Tensor:
    """``[n]`` int32 ``reselect`` of the rows (package doc); the three int32 ``[slots + 1]`` states are updated in
    place. ``seq_lens`` ``[n]`` int, ``block_table`` ``[n, max_blocks]`` int, ``slots`` ``[n]`` int64."""
    lens, blocks, tail = last_blocks(seq_lens, block_table, block_size)
    before, age = seq_len_state[slots], age_state[slots]
    continues = (lens == before + 1) & (blocks == (before + block_size - 1) // block_size)
    reuse = continues & (tail == tail_state[slots]) & (blocks > 0) & (slots < num_slots) & (age + 1 < every)
    reuse &= same_width
    seq_len_state[slots], tail_state[slots], age_state[slots] = lens, tail, torch.where(reuse, age + 1, 0)
    return (~reuse).to(torch.int32)


def last_blocks(seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 ``[n]`` each: the rows' lengths, block counts and last physical blocks (0 for an empty table)."""
    lens = seq_lens.to(torch.int32)
    blocks = (lens + block_size - 1) // block_size
    last = (blocks - 1).clamp(min=0, max=max(block_table.shape[1] - 1, 0)).long()
    tail = block_table.gather(1, last[:, None])[:, 0].to(torch.int32) if block_table.shape[1] else lens * 0
    return lens, blocks, tail
