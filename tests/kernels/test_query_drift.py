"""ucm_kernels.query_drift (selection reuse's drift rule) against its loop reference, the Triton launch and the torch
twin: rows that keep their lists, rows whose queries turned, rows the step's rule reselects anyway, a slot never
written, padding rows sharing the spare slot, strided queries, non-power-of-two heads; bad inputs named."""
import pytest
import torch

from ucm_kernels.query_drift import naive_query_drift, query_drift, torch_query_drift

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOTS, HEADS, DIM = 6, 6, 24


def turned(q: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """``q`` moved towards a random direction by ``amount`` (0: unchanged, 1: unrelated)."""
    other = torch.randn(q.shape, generator=gen)
    return (1 - amount) * q + amount * other * q.norm(dim=-1, keepdim=True) / other.norm(dim=-1, keepdim=True)


def run_all(q: torch.Tensor, kept_q: torch.Tensor, slots: list, reselect: list, threshold: float) -> list:
    """One layer through the Triton launch, the torch twin (on a copy of ``kept_q``) and the loop reference (on
    another copy, on the CPU); the results and every non-spare slot's kept query must agree exactly."""
    rows = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    mask = torch.tensor(reselect, dtype=torch.int32, device=DEVICE)
    twin, expected = kept_q.clone(), kept_q.cpu().clone()
    got = query_drift(q, kept_q, rows, mask, threshold=threshold)
    twin_got = torch_query_drift(q, twin, rows, mask, threshold=threshold)
    want = naive_query_drift(q.cpu(), expected, rows.cpu(), mask.cpu(), threshold=threshold)
    assert got.dtype == twin_got.dtype == torch.int32
    assert got.tolist() == twin_got.tolist() == want
    assert torch.equal(kept_q[:SLOTS].cpu(), expected[:SLOTS]) and torch.equal(twin[:SLOTS].cpu(), expected[:SLOTS])
    return want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_keep_their_lists_until_their_queries_turn(dtype):
    gen = torch.Generator().manual_seed(0)
    selected_with = torch.randn(4, HEADS, DIM, generator=gen)
    kept_q = torch.zeros(SLOTS + 1, HEADS, DIM, dtype=dtype, device=DEVICE)
    first = torch.cat([selected_with, torch.zeros(1, HEADS, DIM)]).to(dtype).to(DEVICE)  # row 4: padding
    slots = [3, 0, 5, 1, SLOTS]
    assert run_all(first, kept_q, slots, [1, 1, 1, 1, 1], 0.1) == [1, 1, 1, 1, 1]  # first sight stores them
    now = torch.stack([turned(selected_with[0], 0.01, gen), turned(selected_with[1], 0.9, gen),
                       selected_with[2], turned(selected_with[3], 0.02, gen)])
    storage = torch.zeros(5, 2 * DIM, HEADS, dtype=dtype, device=DEVICE)  # queries as a view, no dim contiguous
    q = storage[:, ::2].transpose(1, 2)
    q[:4] = now.to(dtype)
    # row 0 barely moved; row 1 turned; row 2 did not move but the step reselects it; row 3 moved a little
    assert run_all(q, kept_q, slots, [0, 0, 1, 0, 1], 0.1) == [0, 1, 1, 0, 1]
    assert torch.equal(kept_q[0].cpu(), q[1].cpu()) and torch.equal(kept_q[3].cpu(), first[0].cpu())
    # a tighter threshold: row 0's small drift now counts, row 3's (measured from its first query) too
    assert run_all(q, kept_q, slots, [0, 0, 0, 0, 1], 1e-6) == [1, 0, 0, 1, 1]


def test_a_slot_never_written_selects_and_odd_shapes_work():
    gen = torch.Generator().manual_seed(1)
    kept_q = torch.zeros(SLOTS + 1, 3, 5, dtype=torch.float16, device=DEVICE)
    q = torch.randn(2, 3, 5, generator=gen).half().to(DEVICE)
    assert run_all(q, kept_q, [2, 4], [0, 0], 0.5) == [1, 1]  # zero kept queries: similarity 0, drift 1
    assert run_all(q, kept_q, [2, 4], [0, 0], 0.5) == [0, 0]
    assert run_all(q, kept_q, [4, 2], [0, 0], 1.99) == [0, 0]  # the queries swapped slots: drift about 1
    empty = q[:0]
    assert query_drift(empty, kept_q, torch.zeros(0, dtype=torch.int64, device=DEVICE),
                       torch.zeros(0, dtype=torch.int32, device=DEVICE), threshold=0.5).shape == (0,)


def test_out_is_written_in_place():
    kept_q = torch.zeros(SLOTS + 1, HEADS, DIM, device=DEVICE)
    q = torch.ones(2, HEADS, DIM, device=DEVICE)
    out = torch.full((2,), 7, dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([0, 1], device=DEVICE)
    mask = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    assert query_drift(q, kept_q, rows, mask, threshold=0.1, out=out) is out and out.tolist() == [1, 1]
    twin_out = torch.full((2,), 7, dtype=torch.int32, device=DEVICE)
    assert torch_query_drift(q, kept_q, rows, mask, threshold=0.1, out=twin_out) is twin_out
    assert twin_out.tolist() == [1, 0]  # both slots hold these queries now


def test_bad_inputs_are_named():
    kept_q = torch.zeros(SLOTS + 1, HEADS, DIM, device=DEVICE)
    q = torch.ones(2, HEADS, DIM, device=DEVICE)
    rows = torch.tensor([0, 1], device=DEVICE)
    mask = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="kept_q: got shape .* dtype torch.float16"):
        query_drift(q, kept_q.half(), rows, mask, threshold=0.1)
    with pytest.raises(ValueError, match="slots: got"):
        query_drift(q, kept_q, rows.int(), mask, threshold=0.1)
    with pytest.raises(ValueError, match=r"slots / reselect: 2 / 1 rows, q has 2"):
        query_drift(q, kept_q, rows, mask[:1], threshold=0.1)
    with pytest.raises(ValueError, match=r"kept_q: shape \(7, 4, 24\)"):
        query_drift(q, kept_q[:, :4], rows, mask, threshold=0.1)
    with pytest.raises(ValueError, match=r"threshold: got 0.0, expected a drift in \(0, 2\)"):
        query_drift(q, kept_q, rows, mask, threshold=0.0)
    with pytest.raises(ValueError, match=r"threshold: got 2.0"):
        query_drift(q, kept_q, rows, mask, threshold=2.0)
    with pytest.raises(ValueError, match=r"slots: stride 2, expected a contiguous \[n=2\] tensor"):
        query_drift(q, kept_q, torch.arange(4, device=DEVICE)[::2], mask, threshold=0.1)
    with pytest.raises(ValueError, match=r"out: got shape \(3,\)"):
        query_drift(q, kept_q, rows, mask, threshold=0.1, out=torch.zeros(3, dtype=torch.int32, device=DEVICE))
