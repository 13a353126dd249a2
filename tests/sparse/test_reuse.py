"""ucm_sparse.reuse: which rows reselect (continuation, block fill, age, another request, padding rows), slots
found by a row's last block wherever the request sits, the slot map of named requests and its device copy; a
placement by slot refused where the selection cannot write it."""
import pytest
import torch

from ucm_sparse import ops
from ucm_sparse.config import GSAConfig
from ucm_sparse.reuse import RequestReuse, ReuseBook, SlotMap

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels take CUDA tensors only


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
    first = reuse.step(["a", "b"], [5, 6], 2, "cpu").slots
    again = reuse.step(["a", "b"], [6, 7], 2, "cpu").slots
    assert again is first and first.tolist() == [0, 1]
    swapped = reuse.step(["b", "a"], [8, 7], 2, "cpu").slots
    assert swapped is not first and swapped.tolist() == [1, 0]


def test_request_reuse_decides_on_the_host_as_the_book_does_on_the_device():
    """Named requests joining, leaving, reordering, sitting out steps, restarting shorter and a table that widens,
    over 60 random steps: the host's rows to reselect equal :class:`ReuseBook`'s given the same slots and each
    request's own blocks; the slots come as a slice exactly when they are consecutive and ascending."""
    every, block = 3, 4
    reuse, book = RequestReuse(every, block), ReuseBook(every, slots=16, block_size=block, device="cpu")
    gen = torch.Generator().manual_seed(0)
    lens, blocks, next_block, width = {}, {}, 0, 8
    reselected = 0
    for step in range(60):
        if step in (20, 41):
            width *= 2
        for name in [n for n in lens if torch.rand(1, generator=gen) < 0.05]:
            reuse.finish(name)
            book.forget(reuse._slots._slots.get(name, -1))  # the slot the host frees
            del lens[name], blocks[name]
        while len(lens) < 4:
            name = f"r{step}_{len(lens)}"
            lens[name], blocks[name] = int(torch.randint(1, 12, (1,), generator=gen)), []
        if step == 33:  # a request restarts shorter (its id kept)
            restarted = next(iter(lens))
            lens[restarted] = 2
        ids = [n for n in lens if torch.rand(1, generator=gen) < 0.8] or list(lens)[:1]
        ids = [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
        for name in ids:
            lens[name] += 1
            while len(blocks[name]) < -(-lens[name] // block):
                blocks[name].append(next_block)
                next_block += 1
        table = torch.tensor([blocks[n][:width] + [0] * (width - len(blocks[n][:width])) for n in ids],
                             dtype=torch.int32)
        got = reuse.step(ids, [lens[n] for n in ids], width, "cpu")
        wanted = book.step(torch.tensor([lens[n] for n in ids]), table, got.slots, width).tolist()
        assert got.reselect == wanted, step
        slots = got.slots.tolist()
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        assert (got.span == slice(slots[0], slots[0] + len(slots))) if consecutive else got.span is None
        reselected += sum(wanted)
    assert 0 < reselected < 0.7 * 60 * 3


def test_a_step_that_reselects_no_row_launches_no_selection_and_reads_the_lists_in_place(monkeypatch):
    """Every row reselecting selects without a mask; no row reselecting calls no selection, and the lists of
    consecutive slots are a view of the store (others a copy); mixed steps mask; every step's lists equal those
    the rows were given when they last reselected."""
    calls = []
    real_select = ops.select
    monkeypatch.setattr(ops, "select", lambda *a, **k: calls.append(k.get("reselect")) or real_select(*a, **k))
    config = GSAConfig(sparse_ratio=0.5, local_window_sz=1, init_window_sz=1, min_blocks=2, select_every=4)
    reuse = RequestReuse(config.select_every, block_size=4)
    reprs = tuple(torch.randn(16, 2, 8) for _ in range(3))
    blocks = table(list(range(0, 8)), list(range(8, 16)))
    kept = {}

    def run(step, ids, lens, q):
        plan = reuse.step(ids, lens, 8, "cpu")
        rows = [[0, 1].index(["a", "b"].index(n)) for n in ids]
        got = reuse.select(0, step, "torch", q, reprs, blocks[rows], torch.tensor(lens, dtype=torch.int32), config,
                           plan, 8)
        fresh = ops.select("torch", q, reprs, blocks[rows], torch.tensor(lens, dtype=torch.int32), config, 4)
        calls.pop()
        for row, (name, again) in enumerate(zip(ids, plan.reselect)):
            if again:
                kept[name] = (fresh.sel_idx[row].clone(), fresh.sel_count[row].clone())
            assert torch.equal(got.sel_idx[row], kept[name][0]) and torch.equal(got.sel_count[row], kept[name][1])
        return plan, got

    gen = torch.Generator().manual_seed(1)
    q = lambda n: torch.randn(n, 4, 8, generator=gen)  # noqa: E731
    plan, _ = run(1, ["a", "b"], [21, 26], q(2))
    assert plan.reselect == [1, 1] and calls == [None]
    plan, got = run(2, ["a", "b"], [22, 27], q(2))
    assert plan.reselect == [0, 0] and calls == [None] and plan.span == slice(0, 2)
    stored = reuse._stores[0][0].buffers(got.sel_idx.shape[2])[0]
    assert got.sel_idx.data_ptr() == stored.data_ptr()  # read in place
    plan, got = run(3, ["b", "a"], [28, 23], q(2))
    assert plan.reselect == [0, 0] and plan.span is None and got.sel_idx.data_ptr() != stored.data_ptr()
    plan, _ = run(4, ["a", "b"], [24, 29], q(2))  # a's 24th token: same block; b's 29th opens one
    assert plan.reselect == [0, 1] and calls[-1].tolist() == [0, 1]


def test_select_names_sel_rows_outside_the_one_stage_triton_selection():
    config = GSAConfig(sparse_ratio=0.5)
    q = torch.randn(1, 2, 8)
    reprs = tuple(torch.zeros(4, 2, 8) for _ in range(3))
    kept = ops.Selection(torch.full((2, 2, 4), -1, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="sel_rows: taken by the one-stage Triton selection with kept only "
                                         r"\(backend 'torch'"):
        ops.select("torch", q, reprs, table([0, 1]), torch.tensor([8], dtype=torch.int32), config, 4, kept=kept,
                   reselect=torch.ones(1, dtype=torch.int32), sel_rows=torch.zeros(1, dtype=torch.int64))


@pytest.mark.parametrize("backend, dtype, device", [("torch", torch.float32, "cpu"),
                                                   ("triton", torch.bfloat16, TRITON_DEVICE)])
def test_with_a_drift_rule_a_request_whose_queries_turned_reselects_early(backend, dtype, device):
    """select_every 8 and select_drift 0.1 over named requests: at steps the reuse rule keeps both rows, the
    selection runs with the layer's mask (drifted rows only), a turned request takes the lists its new queries
    select and the other keeps its own; queries that barely move keep their lists."""
    config = GSAConfig(sparse_ratio=0.5, local_window_sz=1, init_window_sz=1, min_blocks=2, select_every=8,
                       select_drift=0.1)
    reuse = RequestReuse(config.select_every, block_size=4)
    gen = torch.Generator().manual_seed(3)
    reprs = tuple(torch.randn(16, 2, 8, generator=gen).to(dtype).to(device) for _ in range(3))
    blocks = table(list(range(0, 8)), list(range(8, 16))).to(device)
    q = torch.randn(2, 4, 8, generator=gen).to(dtype).to(device)
    lens = [21, 25]
    in_use, selected_with = None, {}
    for step, turning in ((1, None), (2, 1), (3, None), (4, 0)):
        plan = reuse.step(["a", "b"], lens, 8, device)
        assert plan.reselect == ([1, 1] if step == 1 else [0, 0])
        if turning is not None:
            q[turning] = torch.randn(4, 8, generator=gen).to(dtype).to(device)
        q[1 - (turning or 0)] += (0.01 * torch.randn(4, 8, generator=gen)).to(dtype).to(device)
        seq = torch.tensor(lens, dtype=torch.int32, device=device)
        got = reuse.select(0, step, backend, q, reprs, blocks, seq, config, plan, 8)
        fresh = ops.select(backend, q, reprs, blocks, seq, config, 4)
        kept_q = reuse._stores[0][0].queries(q)[plan.slots]
        for row in range(2):
            again = step == 1 or row == turning
            wanted = fresh if again else in_use
            assert torch.equal(got.sel_idx[row], wanted.sel_idx[row]), (step, row)
            if again:
                selected_with[row] = q[row].clone()
            assert torch.equal(kept_q[row], selected_with[row]), (step, row)  # drift from the selecting query
        if turning is not None:
            assert not torch.equal(fresh.sel_idx[turning], in_use.sel_idx[turning])  # the test tells them apart
        in_use = ops.Selection(got.sel_idx.clone(), got.sel_count.clone())
        lens = [n + 1 for n in lens]
