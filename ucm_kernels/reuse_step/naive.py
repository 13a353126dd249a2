"""Loop reference of :func:`reuse_step`: one row at a time, on Python ints, straight from the contract."""
import torch


def naive_reuse_step(seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor, state: dict, *,
                     block_size: int, every: int, num_slots: int, same_width: bool) -> list[int]:
    """``reselect`` as a list; ``state`` (``{"seq_len", "tail", "age"}`` -> lists indexed by slot) is updated in
    place, rows in order (a later row naming the same slot, only ever the spare, overwrites an earlier one)."""
    reselect = []
    for r, (length, slot) in enumerate(zip(seq_lens.tolist(), slots.tolist())):
        blocks = -(-length // block_size)
        width = block_table.shape[1]
        tail = int(block_table[r, min(max(blocks - 1, 0), width - 1)]) if width else 0
        before, age = state["seq_len"][slot], state["age"][slot]
        keep = (length == before + 1 and blocks == -(-before // block_size) and tail == state["tail"][slot]
                and blocks > 0 and slot < num_slots and age + 1 < every and same_width)
        state["seq_len"][slot], state["tail"][slot] = length, tail
        state["age"][slot] = age + 1 if keep else 0
        reselect.append(0 if keep else 1)
    return reselect
