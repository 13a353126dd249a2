"""ucm_kernels.reuse_step (selection reuse's per-step bookkeeping) against its loop reference, the Triton launch and
the torch twin step by step: requests that continue, open a block, jump, change block, age out, pad, share the
spare slot; a table width change; an empty table; bad inputs named."""
import pytest
import torch

from ucm_kernels.reuse_step import naive_reuse_step, reuse_step, torch_reuse_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOTS, BLOCK = 6, 4


def fresh_state() -> dict:
    """int32 [SLOTS + 1] states as ReuseBook starts them: unknown lengths and blocks, age 0."""
    return {"seq_len": torch.full((SLOTS + 1,), -1, dtype=torch.int32, device=DEVICE),
            "tail": torch.full((SLOTS + 1,), -1, dtype=torch.int32, device=DEVICE),
            "age": torch.zeros(SLOTS + 1, dtype=torch.int32, device=DEVICE)}


def run_all(state: dict, expected: dict, seq_lens: list, table: torch.Tensor, slots: list, *, every: int,
            same_width: bool = True, lens_dtype=torch.int32) -> list:
    """One step through the Triton launch, the torch twin (on a copy of ``state``) and the loop reference (on the
    lists ``expected``); every result and every non-spare slot's state must agree. Returns the reselect list."""
    lens = torch.tensor(seq_lens, dtype=lens_dtype, device=DEVICE)
    rows = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    twin = {name: tensor.clone() for name, tensor in state.items()}
    args = dict(block_size=BLOCK, every=every, num_slots=SLOTS, same_width=same_width)
    got = reuse_step(lens, table, rows, state["seq_len"], state["tail"], state["age"], **args)
    twin_got = torch_reuse_step(lens, table, rows, twin["seq_len"], twin["tail"], twin["age"], **args)
    want = naive_reuse_step(lens.cpu(), table.cpu(), rows.cpu(), expected, **args)
    assert got.dtype == torch.int32 and got.tolist() == want == twin_got.tolist()
    for name in state:  # the spare slot (last) is written by every padding row: which one wins is unspecified
        assert state[name][:SLOTS].tolist() == expected[name][:SLOTS] == twin[name][:SLOTS].tolist(), name
    return want


@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64])
def test_rows_keep_their_lists_until_a_block_opens_they_age_or_the_request_changes(lens_dtype):
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(64, generator=gen)[:5 * 8].view(5, 8).int().to(DEVICE)
    state = fresh_state()
    expected = {name: tensor.tolist() for name, tensor in state.items()}
    steps = [  # (lengths, slots): rows 0-3 real requests, row 4 padding on the spare slot
        ([5, 9, 2, 13, 0], [0, 1, 2, 3, SLOTS]),  # first sight: every row selects
        ([6, 10, 3, 14, 0], [0, 1, 2, 3, SLOTS]),  # all continue inside their last block
        ([7, 11, 4, 15, 0], [1, 0, 2, 3, SLOTS]),  # rows 0 / 1 swap slots: both jump
        ([8, 12, 5, 16, 0], [1, 0, 2, 3, SLOTS]),  # row 2 opens a block; row 3's lists are 3 steps old
        ([9, 13, 6, 17, 0], [1, 0, 2, 3, SLOTS]),  # rows 0, 1 and 3 open a block
        ([10, 14, 7, 18, 0], [1, 0, 2, 5, SLOTS]),  # row 3 moves to a never-used slot
    ]
    seen = [run_all(state, expected, lens, table, slots, every=3, lens_dtype=lens_dtype) for lens, slots in steps]
    assert seen == [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 0, 0, 1], [0, 0, 1, 1, 1], [1, 1, 0, 1, 1],
                    [0, 0, 0, 1, 1]]

def test_a_table_width_change_an_empty_table_and_every_1_reselect():
    table = torch.arange(12, dtype=torch.int32, device=DEVICE).view(3, 4)
    state = fresh_state()
    expected = {name: tensor.tolist() for name, tensor in state.items()}
    run_all(state, expected, [5, 6, 8], table, [0, 1, 2], every=4)
    assert run_all(state, expected, [6, 7, 9], table, [0, 1, 2], every=4) == [0, 0, 1]  # row 2 opens block 3
    assert run_all(state, expected, [7, 8, 10], table, [0, 1, 2], every=4, same_width=False) == [1, 1, 1]
    assert run_all(state, expected, [8, 9, 11], table, [0, 1, 2], every=1) == [1, 1, 1]
    empty = torch.zeros(3, 0, dtype=torch.int32, device=DEVICE)
    run_all(state, expected, [0, 0, 0], empty, [SLOTS, SLOTS, SLOTS], every=4)


def test_a_changed_last_block_reselects():
    table = torch.arange(12, dtype=torch.int32, device=DEVICE).view(3, 4)
    state = fresh_state()
    expected = {name: tensor.tolist() for name, tensor in state.items()}
    run_all(state, expected, [5, 6, 7], table, [0, 1, 2], every=8)
    moved = table.clone()
    moved[1, 1] = 11  # row 1's last block is another physical block now; row 2 did not grow
    assert run_all(state, expected, [6, 7, 7], moved, [0, 1, 2], every=8) == [0, 1, 1]


def test_bad_inputs_are_named():
    state = fresh_state()
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    table = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    args = dict(block_size=BLOCK, every=2, num_slots=SLOTS, same_width=True)
    with pytest.raises(ValueError, match="slots: got"):
        reuse_step(lens, table, slots.int(), state["seq_len"], state["tail"], state["age"], **args)
    with pytest.raises(ValueError, match=r"age_state: got shape \(3,\)"):
        reuse_step(lens, table, slots, state["seq_len"], state["tail"], state["age"][:3], **args)
    with pytest.raises(ValueError, match="block_table / slots: 2 / 1 rows"):
        reuse_step(lens, table.repeat(2, 1), slots, state["seq_len"], state["tail"], state["age"], **args)
