"""ucm_sparse.reuse: which rows reselect (continuation, block fill, age, slot change, padding rows) and the
slot map of named requests."""
import torch

from ucm_sparse.reuse import ReuseBook, SlotMap


def table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_rows_reuse_while_they_continue_and_reselect_when_a_block_fills_or_they_age():
    book = ReuseBook(every=3, slots=4, block_size=4, device="cpu")
    blocks = table([7, 8, 9, 0], [3, 4, 0, 0])
    assert book.step(torch.tensor([9, 5]), blocks).tolist() == [1, 1]  # new
    assert book.step(torch.tensor([10, 6]), blocks).tolist() == [0, 0]
    assert book.step(torch.tensor([11, 7]), blocks).tolist() == [0, 0]
    assert book.step(torch.tensor([12, 8]), blocks).tolist() == [1, 1]  # 3 steps old
    assert book.step(torch.tensor([13, 9]), blocks).tolist() == [1, 1]  # both filled a block (12 -> 13, 8 -> 9)


def test_a_row_that_jumped_shrank_changed_its_last_block_or_was_absent_reselects():
    book = ReuseBook(every=8, slots=4, block_size=4, device="cpu")
    blocks = table([7, 8, 9], [3, 4, 5], [1, 2, 6])
    book.step(torch.tensor([9, 9, 9]), blocks)
    moved = table([7, 8, 9], [3, 4, 11], [1, 2, 6])
    assert book.step(torch.tensor([11, 10, 10]), moved).tolist() == [1, 1, 0]  # +2 tokens; another last block
    assert book.step(torch.tensor([12, 11]), moved[:2]).tolist() == [0, 0]  # row 2 leaves the step
    assert book.step(torch.tensor([12, 12, 11]), moved).tolist() == [1, 0, 1]  # 12 again; row 2 was absent
    assert book.step(torch.tensor([0, 13, 12]), moved).tolist() == [1, 1, 0]  # padding row; 13 fills a block


def test_slots_name_rows_and_forget_releases_them():
    book = ReuseBook(every=4, slots=4, block_size=4, device="cpu")
    blocks = table([7, 8, 9], [3, 4, 5])
    book.step(torch.tensor([9, 10]), blocks, torch.tensor([2, 0]))
    assert book.step(torch.tensor([11, 10]), blocks.flip(0), torch.tensor([0, 2])).tolist() == [0, 0]
    book.forget(2)
    assert book.step(torch.tensor([12, 11]), blocks.flip(0), torch.tensor([0, 2])).tolist() == [0, 1]


def test_slot_map_hands_out_freed_slots_and_grows():
    slots = SlotMap(capacity=2)
    assert slots.assign(["a", "b"]) == [0, 1] and slots.capacity == 2
    assert slots.assign(["c", "a"]) == [2, 0] and slots.capacity == 4
    assert slots.release("b") == 1 and slots.release("zz") is None
    assert slots.assign(["d", "c"]) == [1, 2]
