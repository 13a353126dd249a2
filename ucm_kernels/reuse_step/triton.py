"""Triton kernel and launcher of :func:`reuse_step`: one lane per row, one launch per decode step."""
import torch
import triton
import triton.language as tl

from .._launch import Launcher, wait_for_previous_grid
from .._utils import INDEX_DTYPES, cdiv, check_tensor

_ROWS = 128  # rows per program


@triton.jit(do_not_specialize=["n", "table_width", "block_size", "every", "num_slots", "same_width"])
def _reuse_step_kernel(seq_lens, block_table, slots, seq_len_state, tail_state, age_state, reselect, n,
                       stride_tb, stride_tj, table_width, block_size, every, num_slots, same_width,
                       ROWS: tl.constexpr, PDL: tl.constexpr = 0):
    wait_for_previous_grid(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    inside = rows < n
    lens = tl.load(seq_lens + rows, mask=inside, other=0).to(tl.int32)
    blocks = (lens + block_size - 1) // block_size  # lens >= 0: truncation is the floor
    last = tl.minimum(tl.maximum(blocks - 1, 0), tl.maximum(table_width - 1, 0))
    tail = tl.load(block_table + rows.to(tl.int64) * stride_tb + last.to(tl.int64) * stride_tj,
                   mask=inside & (table_width > 0), other=0).to(tl.int32)
    slot = tl.load(slots + rows, mask=inside, other=0)
    before = tl.load(seq_len_state + slot, mask=inside, other=-1)
    age = tl.load(age_state + slot, mask=inside, other=0)
    continues = (lens == before + 1) & (blocks == (before + block_size - 1) // block_size)  # before >= -1
    reuse = continues & (tail == tl.load(tail_state + slot, mask=inside, other=-1)) & (blocks > 0)
    reuse = reuse & (slot < num_slots) & (age + 1 < every) & (same_width != 0)
    tl.store(seq_len_state + slot, lens, mask=inside)
    tl.store(tail_state + slot, tail, mask=inside)
    tl.store(age_state + slot, tl.where(reuse, age + 1, 0), mask=inside)
    tl.store(reselect + rows, tl.where(reuse, 0, 1), mask=inside)


_REUSE_STEP = Launcher(_reuse_step_kernel)


def reuse_step(seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor, seq_len_state: torch.Tensor,
               tail_state: torch.Tensor, age_state: torch.Tensor, *, block_size: int, every: int, num_slots: int,
               same_width: bool) -> torch.Tensor:
    """One launch of :func:`ucm_kernels.reuse_step.torch_reuse_step` (same contract: ``[n]`` int32 ``reselect``,
    the three int32 ``[num_slots + 1]`` states updated in place; ``seq_lens`` ``[n]`` int, ``block_table``
    ``[n, max_blocks]`` int, ``slots`` ``[n]`` int64 in ``[0, num_slots]``)."""
    device = block_table.device
    n = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) else -1
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, device, "[n]")
    check_tensor("block_table", block_table, 2, INDEX_DTYPES, device, f"[n={n}, max_blocks]")
    check_tensor("slots", slots, 1, (torch.int64,), device, f"[n={n}]")
    for name, state in (("seq_len_state", seq_len_state), ("tail_state", tail_state), ("age_state", age_state)):
        check_tensor(name, state, 1, (torch.int32,), device, f"[num_slots + 1 = {num_slots + 1}] contiguous")
        if state.shape[0] != num_slots + 1 or not state.is_contiguous():
            raise ValueError(f"{name}: got shape {tuple(state.shape)}, expected [num_slots + 1 = {num_slots + 1}] "
                             "contiguous")
    if block_table.shape[0] != n or slots.shape[0] != n:
        raise ValueError(f"block_table / slots: {block_table.shape[0]} / {slots.shape[0]} rows, seq_lens has {n}")
    reselect = torch.empty(n, dtype=torch.int32, device=device)
    if n:
        _REUSE_STEP((cdiv(n, _ROWS),), seq_lens, block_table, slots, seq_len_state, tail_state, age_state,
                    reselect, n, block_table.stride(0), block_table.stride(1), block_table.shape[1], block_size,
                    every, num_slots, int(same_width), ROWS=_ROWS)
    return reselect
