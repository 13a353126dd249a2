"""ucm_sparse.reuse: which rows reselect (continuation, block fill, age, another request, padding rows), slots
found by a row's last block wherever the request sits, the slot map of named requests and its device copy; a
placement by slot refused where the selection cannot write it."""
import pytest
import torch

from ucm_sparse import ops
from ucm_sparse.config import GSAConfig
from ucm_sparse.reuse import RequestReuse, ReuseBook, SlotMap


def table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


def by_tail(book, lens, blocks, new_rows=None):
    """One step keyed by last block: (slots, reselect)."""
    lens = torch.tensor(lens)
    slots = book.tail_slots(lens, blocks, new_rows)
    return slots.tolist(), book.step(lens, blocks, slots).tolist()


def test_rows_reuse_while_they_continue_and_reselect_when_a_block_fills_or_they_age():
    book = ReuseBook(every=3, slots=8, block_size=4, device="cpu")
    blocks = table([7, 8, 9, 0], [3, 4, 0, 0])
    slots, reselect = by_tail(book, [9, 5], blocks)
    assert reselect == [1, 1] and len(set(slots)) == 2  # new
    assert by_tail(book, [10, 6], blocks) == (slots, [0, 0])
    assert by_tail(book, [11, 7], blocks) == (slots, [0, 0])
    assert by_tail(book, [12, 8], blocks) == (slots, [1, 1])  # 3 steps old
    moved, reselect = by_tail(book, [13, 9], blocks)  # both opened a block: new last blocks, new slots
    assert reselect == [1, 1] and not set(moved) & set(slots)


def test_a_request_keeps_its_slot_across_rows_and_turns():
    """Two groups take turns in the same rows and swap rows: each request finds its own slot and lists."""
    book = ReuseBook(every=4, slots=8, block_size=4, device="cpu")
    a, b = table([7, 8, 9], [3, 4, 5]), table([1, 2, 6], [10, 11, 12])
    slots_a, _ = by_tail(book, [9, 10], a)
    slots_b, _ = by_tail(book, [9, 11], b)
    assert by_tail(book, [10, 11], a) == (slots_a, [0, 0])
    assert by_tail(book, [12, 10], b.flip(0)) == (slots_b[::-1], [0, 0])


def test_another_request_in_a_row_a_jump_a_new_prompt_or_padding_reselects():
    book = ReuseBook(every=8, slots=8, block_size=4, device="cpu")
    blocks = table([7, 8, 9], [3, 4, 5], [1, 2, 6])
    slots, _ = by_tail(book, [9, 9, 9], blocks)
    moved = table([7, 8, 9], [3, 4, 11], [1, 2, 6])
    assert by_tail(book, [11, 10, 10], moved)[1] == [1, 1, 0]  # +2 tokens; another last block
    fresh, reselect = by_tail(book, [12, 11, 11], moved, torch.tensor([False, False, True]))
    assert reselect == [0, 0, 1] and fresh[2] != slots[2]  # a row whose blocks came from elsewhere
    book.forget_tails(torch.tensor([12]), moved[:1], torch.tensor([True]))  # row 0's last block starts a prompt
    padded, reselect = by_tail(book, [13, 0, 12], moved)
    assert reselect == [1, 1, 0] and padded[1] == book.slots  # the spare slot; row 2 continues in its new slot


def test_a_new_table_width_reselects_every_row():
    book = ReuseBook(every=8, slots=4, block_size=4, device="cpu")
    by_tail(book, [9], table([7, 8, 9]))
    assert by_tail(book, [10], table([7, 8, 9, 0]))[1] == [1]


def test_named_slots_and_forget():
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


def test_request_reuse_copies_slots_to_the_device_only_when_they_change():
    reuse = RequestReuse(every=4, block_size=4)
    blocks = table([0, 1], [2, 3])
    first, _ = reuse.step(["a", "b"], torch.tensor([5, 6]), blocks)
    again, _ = reuse.step(["a", "b"], torch.tensor([6, 7]), blocks)
    assert again is first and first.tolist() == [0, 1]
    swapped, _ = reuse.step(["b", "a"], torch.tensor([8, 7]), blocks)
    assert swapped is not first and swapped.tolist() == [1, 0]


def test_select_names_sel_rows_outside_the_one_stage_triton_selection():
    config = GSAConfig(sparse_ratio=0.5)
    q = torch.randn(1, 2, 8)
    reprs = tuple(torch.zeros(4, 2, 8) for _ in range(3))
    kept = ops.Selection(torch.full((2, 2, 4), -1, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="sel_rows: taken by the one-stage Triton selection with kept only "
                                         r"\(backend 'torch'"):
        ops.select("torch", q, reprs, table([0, 1]), torch.tensor([8], dtype=torch.int32), config, 4, kept=kept,
                   reselect=torch.ones(1, dtype=torch.int32), sel_rows=torch.zeros(1, dtype=torch.int64))
