"""block_select kernels vs the torch reference; selections compare as index sets per (request, KV head)."""
import dataclasses
import math

import pytest
import torch

from ucm_kernels.block_repr import empty_block_repr, naive_update_block_repr, update_block_repr
from ucm_kernels.block_select import naive_block_scores, naive_num_selected, naive_select_blocks, select_blocks
from ucm_kernels.block_select import plan_select, select_from_scores, selection_counts, selection_width
from ucm_kernels.block_select import torch_select_blocks
from ucm_kernels.block_select import radix as block_select_radix
from ucm_kernels.block_select import sliced as block_select_sliced
from ucm_kernels.block_select import triton as block_select_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
SIZES = dict(block_size=16, sparse_ratio=0.3, init_window=1, local_window=2, min_blocks=3)
SEQ_LENS = [403, 17, 150, 229]  # ragged, none a multiple of 16: 26, 2 (dense), 10 and 15 blocks
# Scores are fp32 sums in a different order from the reference's: a swap within this margin is a tie.
TIE_TOL = 1e-4


def make_case(seq_lens=SEQ_LENS, kv_heads=2, group=4, head_dim=64, max_blocks=28, dtype=torch.bfloat16,
              repr_dtype=torch.bfloat16, seed=0):
    """Random paged K, reprs of every physical block, a shuffled block table and decode queries (and ``kscale``
    with fp8 reprs: then every block's keys get their own magnitude, 2**-8 to 2**12, so the scales differ)."""
    gen = torch.Generator().manual_seed(seed)
    batch, num_blocks = len(seq_lens), len(seq_lens) * max_blocks + 3
    key_cache = torch.randn(num_blocks, SIZES["block_size"], kv_heads, head_dim, generator=gen)
    if repr_dtype == FP8:
        key_cache *= torch.exp2(torch.randint(-8, 13, (num_blocks, 1, kv_heads, 1), generator=gen).float())
    key_cache = key_cache.to(dtype).to(DEVICE)
    reprs = empty_block_repr(key_cache, repr_dtype)
    naive_update_block_repr(key_cache, torch.arange(num_blocks, device=DEVICE), *reprs)
    block_table = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks].view(batch, max_blocks)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=gen).to(dtype)
    case = dict(q=q.to(DEVICE), kmin=reprs[0], kmax=reprs[1], kmean=reprs[2],
                block_table=block_table.to(torch.int32).to(DEVICE),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE))
    return case | ({"kscale": reprs[3]} if repr_dtype == FP8 else {})


def check_selection(case, sel_idx, sel_count, score="quest", **sizes):
    """Counts, windows and -1 padding exact; every chosen competing block scores >= every unchosen one."""
    scores = naive_block_scores(case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"],
                                case["seq_lens"], block_size=sizes["block_size"], score=score,
                                kscale=case.get("kscale")).cpu()
    sel_idx, sel_count = sel_idx.cpu(), sel_count.cpu()
    max_blocks = case["block_table"].shape[1]
    assert sel_idx.shape == (*scores.shape[:2], selection_width(max_blocks, **sizes))
    local = max(sizes["local_window"], 1)
    for b, seq_len in enumerate(case["seq_lens"].tolist()):
        nb = min(-(-seq_len // sizes["block_size"]), max_blocks)
        count = naive_num_selected(nb, **sizes)
        for h in range(scores.shape[1]):
            row = sel_idx[b, h]
            assert sel_count[b, h] == count
            assert (row[count:] == -1).all()
            chosen = row[:count].tolist()
            assert chosen == sorted(set(chosen)) and all(0 <= j < nb for j in chosen)
            if count == nb:
                continue
            windows = set(range(sizes["init_window"])) | set(range(nb - local, nb))
            assert windows <= set(chosen)
            middle = scores[b, h, sizes["init_window"]:nb - local]
            picked = torch.tensor([j - sizes["init_window"] for j in chosen if j not in windows], dtype=torch.long)
            unpicked = torch.ones_like(middle, dtype=torch.bool)
            unpicked[picked] = False
            if unpicked.any() and picked.numel():
                margin = TIE_TOL * (1 + middle.abs().max())
                assert middle[picked].min() >= middle[unpicked].max() - margin


def run(case, **kwargs):
    args = {**SIZES, **kwargs}
    return select_blocks(case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"],
                         case["seq_lens"], kscale=case.get("kscale"), **args), args


@pytest.mark.parametrize("score,dtype,repr_dtype", [
    ("quest", torch.bfloat16, torch.bfloat16), ("mean", torch.bfloat16, torch.bfloat16),
    ("quest", torch.float16, torch.float32), ("mean", torch.float32, torch.float16),
    ("gauss", torch.bfloat16, torch.bfloat16), ("gauss", torch.float32, FP8),
])
def test_matches_reference_on_a_ragged_batch(score, dtype, repr_dtype):
    case = make_case(dtype=dtype, repr_dtype=repr_dtype)
    inputs = {k: v.clone() for k, v in case.items()}
    (sel_idx, sel_count), sizes = run(case, score=score)
    check_selection(case, sel_idx, sel_count, **sizes)
    ref_idx, ref_count = naive_select_blocks(**case, **sizes)
    assert torch.equal(sel_count, ref_count) and sel_idx.shape == ref_idx.shape
    assert all(torch.equal(case[k], inputs[k]) for k in case)


@pytest.mark.parametrize("seed", range(6))
def test_random_configurations(seed):
    gen = torch.Generator().manual_seed(seed)

    def pick(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    seq_lens = [pick(0, 28 * 16) for _ in range(pick(1, 4))]
    case = make_case(seq_lens=seq_lens, group=pick(1, 4), seed=seed)
    kwargs = dict(sparse_ratio=pick(1, 100) / 100, init_window=pick(0, 3), local_window=pick(0, 4),
                  min_blocks=pick(1, 10), token_budget=pick(1, 300) if seed % 2 else None,
                  score=("quest", "mean", "gauss")[seed % 3])
    (sel_idx, sel_count), sizes = run(case, **kwargs)
    check_selection(case, sel_idx, sel_count, **sizes)


@pytest.mark.parametrize("group,kv_heads,head_dim", [(1, 2, 64), (3, 2, 96), (8, 1, 128)])
def test_gqa_groups_sum_the_scores_of_their_query_heads(group, kv_heads, head_dim):
    case = make_case(seq_lens=[403, 229], kv_heads=kv_heads, group=group, head_dim=head_dim)
    for score in ("quest", "mean", "gauss"):
        (sel_idx, sel_count), sizes = run(case, score=score)
        check_selection(case, sel_idx, sel_count, **sizes)


def test_sparse_ratio_one_selects_every_block():
    case = make_case()
    (sel_idx, sel_count), _ = run(case, sparse_ratio=1.0)
    nbs = [-(-n // 16) for n in SEQ_LENS]
    assert sel_count.tolist() == [[nb, nb] for nb in nbs] and sel_idx.shape[2] == case["block_table"].shape[1]
    for b, nb in enumerate(nbs):
        expected = torch.cat([torch.arange(nb), torch.full((sel_idx.shape[2] - nb,), -1)]).to(torch.int32)
        assert all(torch.equal(sel_idx[b, h].cpu(), expected) for h in range(2))


def test_token_budget_selects_a_fixed_number_of_blocks():
    case = make_case()
    (sel_idx, sel_count), sizes = run(case, token_budget=100)  # ceil(100 / 16) = 7 blocks
    assert sel_idx.shape[2] == 7 and sel_count.tolist() == [[7, 7], [2, 2], [7, 7], [7, 7]]
    check_selection(case, sel_idx, sel_count, **sizes)


@pytest.mark.parametrize("init_window,local_window,min_blocks", [(0, 0, 1), (3, 0, 4), (0, 5, 6), (2, 3, 30)])
def test_window_invariants(init_window, local_window, min_blocks):
    """Windows always kept (the current token's block even with local_window 0); min_blocks 30 is all dense."""
    case = make_case()
    (sel_idx, sel_count), sizes = run(case, init_window=init_window, local_window=local_window,
                                      min_blocks=min_blocks)
    check_selection(case, sel_idx, sel_count, **sizes)


def test_windows_win_over_a_smaller_k():
    case = make_case()
    (sel_idx, sel_count), sizes = run(case, sparse_ratio=0.05, init_window=4, local_window=4, min_blocks=1)
    assert sel_count[0].tolist() == [8, 8]
    check_selection(case, sel_idx, sel_count, **sizes)


def test_equal_scores_go_to_the_lowest_logical_blocks():
    case = make_case(seq_lens=[403])
    case["block_table"].fill_(7)  # every logical block is the same physical block: all scores tie
    (sel_idx, sel_count), _ = run(case)
    k = naive_num_selected(26, **SIZES)
    expected = list(range(k - 2)) + [24, 25] + [-1] * (sel_idx.shape[2] - k)  # window 0, ties 1.., window 24, 25
    assert sel_idx[0].tolist() == [expected, expected]


def test_empty_and_short_requests():
    case = make_case(seq_lens=[0, 1, 48, 49])  # 0, 1, 3 blocks: dense; 4 blocks: 3 of them
    (sel_idx, sel_count), sizes = run(case)
    assert sel_count.tolist() == [[0, 0], [1, 1], [3, 3], [3, 3]]
    assert (sel_idx[0] == -1).all()
    check_selection(case, sel_idx, sel_count, **sizes)


def test_writes_the_whole_out_buffers_and_accepts_strided_inputs():
    case = make_case()
    case["q"] = torch.randn(4, 16, 128, device=DEVICE).to(torch.bfloat16)[:, ::2, :64]  # strided query heads
    case["block_table"] = case["block_table"].to(torch.int64)
    case["seq_lens"] = case["seq_lens"].to(torch.int64)
    width = case["block_table"].shape[1] - 2  # wider than needed: padded too
    sel_idx = torch.full((4, 2, width), 12345, dtype=torch.int32, device=DEVICE)
    sel_count = torch.full((4, 2), 12345, dtype=torch.int32, device=DEVICE)
    (got_idx, got_count), sizes = run(case, out=(sel_idx, sel_count))
    assert got_idx is sel_idx and got_count is sel_count
    (ref_idx, ref_count), _ = run(make_case() | {"q": case["q"].contiguous()})
    assert torch.equal(sel_count, ref_count)
    assert torch.equal(sel_idx[:, :, :ref_idx.shape[2]], ref_idx) and (sel_idx[:, :, ref_idx.shape[2]:] == -1).all()


def test_sparse_ratio_is_the_decimal_written():
    case = make_case(seq_lens=[160, 320])  # 10 and 20 blocks: 0.1 of them is exactly 1 and 2
    (sel_idx, sel_count), sizes = run(case, sparse_ratio=0.1, init_window=0, local_window=1, min_blocks=1)
    assert sel_count.tolist() == [[1, 1], [2, 2]]
    check_selection(case, sel_idx, sel_count, **sizes)


BAD_ARGUMENTS = [
    ("block_size", dict(block_size=0)), ("sparse_ratio", dict(sparse_ratio=0.0)),
    ("sparse_ratio", dict(sparse_ratio=1.5)), ("init_window", dict(init_window=-1)),
    ("local_window", dict(local_window=1.5)), ("min_blocks", dict(min_blocks=0)),
    ("score", dict(score="max")), ("token_budget", dict(token_budget=0)),
]


@pytest.mark.parametrize("name,kwargs", BAD_ARGUMENTS)
def test_bad_scalars_raise_naming_the_argument(name, kwargs):
    with pytest.raises(ValueError, match=name):
        run(make_case(seq_lens=[40]), **kwargs)


@pytest.mark.parametrize("name,change", [
    ("q", lambda c: {"q": c["q"][0]}),
    ("q", lambda c: {"q": c["q"].to(torch.int32)}),
    ("kmin", lambda c: {"kmin": None}),
    ("kmax", lambda c: {"kmax": c["kmax"].float()}),
    ("kmin", lambda c: {"kmin": c["kmin"][:, :, :32], "kmax": c["kmax"][:, :, :32]}),  # head_dim differs from q's
    ("block_table", lambda c: {"block_table": c["block_table"].float()}),
    ("block_table", lambda c: {"block_table": c["block_table"][:0]}),
    ("seq_lens", lambda c: {"seq_lens": c["seq_lens"].view(1, 1)}),
    ("out", lambda c: {"out": (torch.empty(1, 2, 9, dtype=torch.int32, device=DEVICE),
                               torch.empty(1, 2, dtype=torch.int32, device=DEVICE))}),
    ("sel_count", lambda c: {"out": (torch.empty(1, 2, 9, dtype=torch.int32, device=DEVICE),
                                     torch.empty(1, 2, dtype=torch.int64, device=DEVICE))}),
])
def test_bad_tensors_raise_naming_the_argument(name, change):
    case = make_case(seq_lens=[40], max_blocks=4)
    case.update(change(case))
    out = case.pop("out", None)
    with pytest.raises(ValueError, match=name):
        select_blocks(case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"],
                      **SIZES, out=out)


def test_mean_rule_needs_no_min_max():
    case = make_case(seq_lens=[403])
    (sel_idx, sel_count), sizes = run(case | {"kmin": None, "kmax": None}, score="mean")
    check_selection(case, sel_idx, sel_count, **sizes)


def test_one_plan_serves_every_layer():
    """plan_select once, run on other layers' inputs (other q, reprs, table and lengths; same shapes): the same
    lists as select_blocks each time."""
    plan = plan_select(4, 2, 64, 28, **SIZES, score="quest", device=DEVICE)
    for seed in range(2):
        case = make_case(seq_lens=[403, 17, 150, 229 + seed * 100], seed=seed)
        sel_idx, sel_count = plan.run(**case)
        (ref_idx, ref_count), sizes = run(case)
        assert torch.equal(sel_idx, ref_idx) and torch.equal(sel_count, ref_count)
        check_selection(case, sel_idx, sel_count, **sizes)


def test_plan_writes_out_buffers():
    case = make_case()
    plan = plan_select(4, 2, 64, 28, **SIZES, token_budget=100, score="mean", device=DEVICE)
    out = (torch.full((4, 2, 28), 12345, dtype=torch.int32, device=DEVICE),
           torch.full((4, 2), 12345, dtype=torch.int32, device=DEVICE))
    got = plan.run(**case, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    (ref_idx, ref_count), _ = run(case, token_budget=100, score="mean")
    assert torch.equal(out[1], ref_count) and torch.equal(out[0][:, :, :7], ref_idx) and (out[0][:, :, 7:] == -1).all()


@pytest.mark.parametrize("plan_shape", [(3, 2, 64, 28), (4, 1, 64, 28), (4, 2, 32, 28), (4, 2, 64, 27)])
def test_plan_rejects_inputs_of_other_shapes(plan_shape):
    plan = plan_select(*plan_shape, **SIZES, device=DEVICE)
    with pytest.raises(ValueError, match="plan was made for"):
        plan.run(**make_case())


@pytest.mark.parametrize("name,args", [("batch", (-1, 2, 64, 28)), ("num_kv_heads", (4, 0, 64, 28)),
                                       ("head_dim", (4, 2, 6.0, 28)), ("max_blocks", (4, 2, 64, 1 << 17))])
def test_plan_select_rejects_bad_shapes(name, args):
    with pytest.raises(ValueError, match=name):
        plan_select(*args, **SIZES, device=DEVICE)


@pytest.mark.parametrize("score,group,token_budget", [("quest", 4, None), ("quest", 3, 100), ("mean", 4, None)])
def test_fp8_reprs_match_the_reference(score, group, token_budget):
    """fp8 reprs and their scales, one-shot and planned, against the reference on the same fp8 reprs."""
    case = make_case(group=group, repr_dtype=FP8)
    inputs = {k: v.clone() for k, v in case.items()}
    (sel_idx, sel_count), sizes = run(case, score=score, token_budget=token_budget)
    check_selection(case, sel_idx, sel_count, **sizes)
    ref_idx, ref_count = naive_select_blocks(**case, **sizes)
    assert torch.equal(sel_count, ref_count) and sel_idx.shape == ref_idx.shape
    planned = plan_select(4, 2, 64, 28, **sizes, device=DEVICE).run(**case)
    assert torch.equal(planned[0], sel_idx) and torch.equal(planned[1], sel_count)
    bits = {k: v.view(torch.uint8) if v.dtype == FP8 else v for k, v in inputs.items()}
    assert all(torch.equal(case[k].view(bits[k].dtype), bits[k]) for k in case)


def test_fp8_quest_scores_bound_the_exact_scores():
    """For keys of every magnitude (2**-11 to 2**11 per key: past fp8's 448, and tiny), the Quest score of the fp8
    reprs the kernel writes is >= the exact one (fp32, from the original keys) for every block and head, for a
    random query and for signed one-hot ones (whose score is one channel's max or -min); the score kernel's own
    fp8 scores match the reference's up to fp32 summation error."""
    gen = torch.Generator().manual_seed(5)
    case = make_case(seq_lens=[403, 229], group=3, seed=4)
    shape = (case["kmin"].shape[0], 16, 2, 64)
    exponents = torch.randint(-8, 9, (shape[0], 1, 2, 1), generator=gen) + torch.randint(-6, 7, shape,
                                                                                       generator=gen) / 2
    key_cache = (torch.randn(shape, generator=gen) * torch.exp2(exponents)).to(torch.bfloat16).to(DEVICE)
    ids = torch.arange(shape[0], device=DEVICE)
    reprs, exact = empty_block_repr(key_cache, FP8), empty_block_repr(key_cache, torch.float32)
    update_block_repr(key_cache, ids, *reprs)
    naive_update_block_repr(key_cache, ids, *exact)
    table = dict(block_table=case["block_table"], seq_lens=case["seq_lens"], block_size=16, score="quest")
    queries = [case["q"]]
    for d in range(64):
        for sign in (1.0, -1.0):
            queries.append(torch.zeros_like(case["q"]))
            queries[-1][:, ::3, d] = sign  # +-e_d in query head 0 of each group: its score is kmax_d or -kmin_d
    for q in queries:
        bound = naive_block_scores(q, *reprs[:3], **table, kscale=reprs[3])
        true = naive_block_scores(q, *exact, **table)
        full = true.isfinite()
        assert full.sum() == 2 * (25 + 14) and (bound[full] >= true[full]).all()
    bound = naive_block_scores(case["q"], *reprs[:3], **table, kscale=reprs[3])
    plan = plan_select(2, 2, 64, 28, **SIZES, score="quest", device=DEVICE)
    plan.run(case["q"], *reprs[:3], case["block_table"], case["seq_lens"], kscale=reprs[3])
    competing = torch.zeros_like(full)
    competing[0, :, 1:24] = competing[1, :, 1:13] = True  # between init window 1 and local window 2
    peak = torch.maximum(-reprs[0].float(), reprs[1].float()) * reprs[3][..., None]  # [num_blocks, heads, d]
    q_abs = case["q"].float().abs().view(2, 2, 3, 64).sum(dim=2)
    magnitude = torch.einsum("bhd,bjhd->bhj", q_abs, peak[case["block_table"].long()])  # sum of |terms|
    assert ((plan.scores - bound).abs() <= 1e-5 * magnitude)[competing].all()


@pytest.mark.parametrize("name,change", [
    ("kscale", lambda c: {"kscale": None}),
    ("kscale", lambda c: {"kscale": c["kscale"][:, :1]}),
    ("kscale", lambda c: {"kscale": c["kscale"].half()}),
    ("kmax", lambda c: {"kmax": c["kmax"].float()}),  # kmin and kmax must share the fp8 dtype
])
def test_bad_fp8_inputs_raise_naming_the_argument(name, change):
    case = make_case(seq_lens=[40], max_blocks=4, repr_dtype=FP8)
    case.update(change(case))
    with pytest.raises(ValueError, match=name):
        run(case)


@pytest.mark.parametrize("mask_dtype", [torch.int32, torch.bool])
def test_reselect_selects_only_the_rows_it_names(mask_dtype):
    """Rows where ``reselect`` is 0 keep what ``out`` held (an earlier step's lists) bit for bit; the others get
    exactly the lists of a full selection, by the plan and by select_blocks alike."""
    case = make_case()
    (ref_idx, ref_count), _ = run(case)
    reselect = torch.tensor([1, 0, 0, 1], dtype=mask_dtype, device=DEVICE)
    keep = ~reselect.bool().cpu()
    plan = plan_select(4, 2, 64, 28, **SIZES, score="quest", device=DEVICE)
    for select in (lambda **kw: plan.run(**case, **kw), lambda **kw: run(case, **kw)[0]):
        held = (torch.randint(-1, 28, ref_idx.shape, dtype=torch.int32, device=DEVICE),
                torch.randint(0, 9, ref_count.shape, dtype=torch.int32, device=DEVICE))
        out = tuple(t.clone() for t in held)
        select(out=out, reselect=reselect)
        for got, before, ref in zip(out, held, (ref_idx, ref_count)):
            got, before, ref = got.cpu(), before.cpu(), ref.cpu()
            assert torch.equal(got[keep], before[keep]) and torch.equal(got[~keep], ref[~keep])


def test_reselect_of_every_row_is_a_full_selection_and_of_none_changes_nothing():
    case = make_case()
    (ref_idx, ref_count), _ = run(case)
    plan = plan_select(4, 2, 64, 28, **SIZES, score="quest", device=DEVICE)
    out = (torch.zeros_like(ref_idx), torch.zeros_like(ref_count))
    plan.run(**case, out=out, reselect=torch.ones(4, dtype=torch.int32, device=DEVICE))
    assert torch.equal(out[0], ref_idx) and torch.equal(out[1], ref_count)
    plan.run(**{**case, "q": -case["q"]}, out=out, reselect=torch.zeros(4, dtype=torch.int32, device=DEVICE))
    assert torch.equal(out[0], ref_idx) and torch.equal(out[1], ref_count)


@pytest.mark.parametrize("reselect,out,match", [
    (torch.ones(3, dtype=torch.int32), True, r"reselect: got shape \(3,\)"),
    (torch.ones(4, dtype=torch.float32), True, "reselect: got shape"),
    (torch.ones(4, dtype=torch.int32), False, "reselect: given without out"),
])
def test_bad_reselect_raises_naming_it(reselect, out, match):
    case = make_case()
    buffers = (torch.zeros(4, 2, 28, dtype=torch.int32, device=DEVICE),
               torch.zeros(4, 2, dtype=torch.int32, device=DEVICE)) if out else None
    with pytest.raises(ValueError, match=match):
        run(case, out=buffers, reselect=reselect.to(DEVICE))


def test_sel_rows_write_each_requests_lists_into_its_row():
    """The lists land in the rows sel_rows names of a larger out (reuse slots); other rows keep their values; with
    reselect, rows not reselected leave their slot alone."""
    case = make_case()
    (ref_idx, ref_count), _ = run(case)
    slots = torch.tensor([5, 1, 3, 0], device=DEVICE)
    out = (torch.full((6, 2, ref_idx.shape[2]), 77, dtype=torch.int32, device=DEVICE),
           torch.full((6, 2), 77, dtype=torch.int32, device=DEVICE))
    plan = plan_select(4, 2, 64, 28, **SIZES, score="quest", device=DEVICE)
    plan.run(**case, out=out, sel_rows=slots, reselect=torch.tensor([1, 1, 0, 1], dtype=torch.int32, device=DEVICE))
    for b, slot in enumerate(slots.tolist()):
        assert torch.equal(out[0][slot], ref_idx[b] if b != 2 else torch.full_like(ref_idx[b], 77))
        assert torch.equal(out[1][slot], ref_count[b] if b != 2 else torch.full_like(ref_count[b], 77))
    assert (out[0][[2, 4]] == 77).all() and (out[1][[2, 4]] == 77).all()
    with pytest.raises(ValueError, match="sel_rows: given without out"):
        plan.run(**case, sel_rows=slots)


@pytest.mark.parametrize("sizes", [SIZES, dict(SIZES, sparse_ratio=0.07, min_blocks=1),
                                   dict(SIZES, token_budget=100), dict(SIZES, sparse_ratio=1.0, local_window=0)])
def test_selection_counts_on_the_device_are_the_host_rule(sizes):
    blocks = torch.arange(0, 700, device=DEVICE)
    expected = [selection_width(n, **sizes) for n in blocks.tolist()]
    assert selection_counts(blocks, **sizes).tolist() == expected


def test_select_from_scores_takes_the_windows_and_the_best_given_scores():
    """Given scores (small integers: many ties; -inf on some blocks): the count rule and windows of select_blocks,
    then the competing blocks of highest score, ties to the lowest logical block, -inf only when nothing else is
    left; the same lists as select_blocks when handed the scores its own kernel computes."""
    gen = torch.Generator().manual_seed(3)
    seq_lens = torch.tensor([403, 17, 150, 229], dtype=torch.int32, device=DEVICE)
    scores = torch.randint(0, 5, (4, 2, 28), generator=gen).float()
    scores[torch.rand(4, 2, 28, generator=gen) < 0.2] = float("-inf")
    sel_idx, sel_count = select_from_scores(scores.to(DEVICE), seq_lens, **SIZES)
    for b, seq_len in enumerate(seq_lens.tolist()):
        nb = -(-seq_len // SIZES["block_size"])
        count = naive_num_selected(nb, **SIZES)
        for h in range(2):
            assert sel_count[b, h] == count and (sel_idx[b, h, count:] == -1).all()
            chosen = sel_idx[b, h, :count].tolist()
            if count == nb:
                assert chosen == list(range(nb))
                continue
            middle = list(range(SIZES["init_window"], nb - SIZES["local_window"]))
            need = count - (nb - len(middle))
            best = sorted(middle, key=lambda j: (-float(scores[b, h, j]), j))[:need]
            assert chosen == sorted(set(range(nb)) - set(middle) | set(best))
    case = make_case()
    plan = plan_select(4, 2, 64, 28, **SIZES, device=DEVICE)
    lists = plan.run(**case)
    again = select_from_scores(plan.scores, case["seq_lens"], **SIZES)
    assert torch.equal(again[0], lists[0]) and torch.equal(again[1], lists[1])


def test_gauss_rule_ranks_blocks_by_estimated_attention_share():
    """A block whose keys are all one key has a point box: its gauss log-mass is that key's logit, so the rule's
    score of a row is the group's softmax shares over the full blocks, and at a plan's own scale the kernel ranks
    as the reference does at that scale (a scale change reorders the shares' sum)."""
    case = make_case(seq_lens=[403, 229], kv_heads=2, group=3)
    point = case["kmin"].clone()
    case |= {"kmax": point, "kmin": point}
    scores = naive_block_scores(case["q"], point, point, None, case["block_table"], case["seq_lens"], block_size=16,
                                score="gauss", scale=0.5).cpu()
    phys = case["block_table"].long().cpu()
    for b, seq_len in enumerate([403, 229]):
        full = seq_len // 16
        logits = torch.einsum("hgd,mhd->hgm", case["q"][b].float().view(2, 3, -1).cpu(),
                              point[phys[b, :full]].float().cpu()) * 0.5
        torch.testing.assert_close(scores[b, :, :full], torch.softmax(logits, -1).sum(1))
        assert (scores[b, :, full:] == float("-inf")).all()
    for scale in (0.05, 0.5):
        (sel_idx, sel_count), sizes = run(case, score="gauss", scale=scale)
        ref_idx, ref_count = naive_select_blocks(**case, **sizes)
        assert torch.equal(sel_idx.cpu(), ref_idx.cpu()) and torch.equal(sel_count.cpu(), ref_count.cpu())


@pytest.mark.parametrize("score", ["quest", "mean", "gauss"])
def test_blocks_with_nan_reprs_rank_first_and_leave_the_other_scores_intact(score):
    """Keys that overflowed to NaN make their blocks' reprs NaN: every rule ranks such a block first (the attention
    over it is NaN whatever is picked), the kernel, the torch twin and the reference agree, and the gauss shares of
    the other blocks stay a softmax over the known ones (a NaN does not wipe its whole row)."""
    case = make_case(seq_lens=[403, 229])
    poisoned = case["block_table"][0, 5:7].long()
    for key in ("kmin", "kmax", "kmean"):
        case[key][poisoned] = float("nan")
    (sel_idx, sel_count), sizes = run(case, score=score)
    ref_idx, ref_count = naive_select_blocks(**case, **sizes)
    twin_idx, twin_count = torch_select_blocks(**case, **sizes)
    assert torch.equal(sel_idx.cpu(), ref_idx.cpu()) and torch.equal(twin_idx.cpu(), ref_idx.cpu())
    assert torch.equal(sel_count.cpu(), ref_count.cpu()) and torch.equal(twin_count.cpu(), ref_count.cpu())
    assert all({5, 6} <= set(ref_idx[0, h].tolist()) for h in range(2))
    if score == "gauss":
        shares = naive_block_scores(case["q"], case["kmin"], case["kmax"], None, case["block_table"],
                                    case["seq_lens"], block_size=16, score="gauss").cpu()
        assert shares[0, :, 5:7].isnan().all() and torch.isfinite(shares[0, :, 7:25]).all()
        known = torch.cat([shares[0, :, :5], shares[0, :, 7:25]], dim=1)  # 25 full blocks; each head's group is 4
        torch.testing.assert_close(known.sum(dim=1), torch.full((2,), 4.0))


def test_gauss_plan_needs_the_query_head_count():
    with pytest.raises(ValueError, match="num_q_heads: got None.*gauss"):
        plan_select(4, 2, 64, 28, **SIZES, score="gauss", device=DEVICE)
    plan = plan_select(4, 2, 64, 28, **SIZES, score="gauss", device=DEVICE, num_q_heads=8)
    case = make_case()
    assert plan.scores.shape == (4, 8, 28)
    (ref_idx, ref_count), sizes = run(case, score="gauss")
    sel_idx, sel_count = plan.run(case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"],
                                  case["seq_lens"])
    assert torch.equal(sel_idx, ref_idx) and torch.equal(sel_count, ref_count)
    with pytest.raises(ValueError, match="q: 4 query heads, the plan was made for num_q_heads = 8"):
        plan.run(case["q"][:, :4], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"])


@pytest.mark.parametrize("score", ["quest", "mean", "gauss"])
def test_every_score_tile_selects_what_the_planned_one_selects(score):
    """The score kernel's tile (blocks per program) is a launch setting: any tile from 1 block to twice the planned
    one gives a valid selection (counts, windows, ranking against the reference's scores) and the planned tile's
    counts; the GPU benchmark times gauss at half the planned tile (bench_block_select.score_tile_variants)."""
    case = make_case(kv_heads=2, group=4)
    plan = plan_select(4, 2, 64, 28, **SIZES, score=score, device=DEVICE, num_q_heads=8)
    args = (case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"])
    planned = [t.clone() for t in plan.run(*args)]
    for tile in sorted({1, 2, max(1, plan.score_tile // 2), 2 * plan.score_tile}):
        sel_idx, sel_count = dataclasses.replace(plan, score_tile=tile).run(*args)
        check_selection(case, sel_idx, sel_count, score=score, **SIZES)
        assert torch.equal(sel_count, planned[1]), tile


@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("score", ["quest", "mean", "gauss"])
def test_top_k_over_several_chunks_selects_what_one_chunk_selects(score, chunk, monkeypatch):
    """The top-k program reads its row in chunks of select_chunk entries (1024 on a GPU: one chunk for these rows).
    Tables of 4 and 15 chunks (ragged batch, GQA group 3, windows, reuse of some rows into kept rows, NaN blocks,
    a block of huge keys in a late chunk: the gauss softmax must take its maximum over every chunk) give the lists
    of the one-chunk plan (for gauss too, whose shares are summed in another order: no near-tie here)."""
    case = make_case(seq_lens=[955, 17, 403, 700], group=3, max_blocks=60)
    for key in ("kmin", "kmax", "kmean"):
        case[key][case["block_table"][2, 9:11].long()] = float("nan")
        case[key][case["block_table"][0, 50].long()] *= 300  # a log-mass past exp's range, in a late chunk
    args = (case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"])
    sizes = dict(SIZES, init_window=2, local_window=3)
    one = plan_select(4, 2, 64, 60, **sizes, score=score, device=DEVICE, num_q_heads=6)
    assert one.keys.shape[2] == 2 * one.select_chunk == 128  # the keys, then the undecided ones
    expected = [t.clone() for t in one.run(*args)]
    monkeypatch.setattr(block_select_triton, "_SELECT_CHUNK", chunk)
    chunked = plan_select(4, 2, 64, 60, **sizes, score=score, device=DEVICE, num_q_heads=6)
    assert chunked.select_chunk == chunk and chunked.keys.shape[2] == (-(-60 // chunk) + 1) * chunk
    sel_idx, sel_count = chunked.run(*args)
    assert torch.equal(sel_count, expected[1]) and torch.equal(sel_idx, expected[0])
    kept = (torch.full_like(expected[0], -7), torch.full_like(expected[1], -7))
    reselect = torch.tensor([1, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    chunked.run(*args, out=kept, reselect=reselect)
    assert (kept[0][1] == -7).all() and (kept[0][3] == -7).all()
    assert torch.equal(kept[1][0::2], expected[1][0::2])


@pytest.mark.parametrize("chunk", [4, 8])
def test_ties_across_chunks_go_to_the_lowest_logical_blocks(chunk, monkeypatch):
    """Scores of a few values (many ties, -inf, NaN, -0.0 beside 0.0) read over several chunks: the same lists as
    in one chunk and as the rule written out (highest score first, NaN above +inf, 0.0 above -0.0, ties to the
    lowest logical block)."""
    gen = torch.Generator().manual_seed(5)
    seq_lens = torch.tensor([955, 403, 229, 33], dtype=torch.int32, device=DEVICE)
    scores = torch.randint(-2, 3, (4, 2, 60), generator=gen).float()
    scores[torch.rand(4, 2, 60, generator=gen) < 0.1] = float("-inf")
    scores[torch.rand(4, 2, 60, generator=gen) < 0.05] = float("nan")
    scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    one = select_from_scores(scores.to(DEVICE), seq_lens, **SIZES)
    monkeypatch.setattr(block_select_triton, "_SELECT_CHUNK", chunk)
    chunked = select_from_scores(scores.to(DEVICE), seq_lens, **SIZES)
    assert torch.equal(chunked[0], one[0]) and torch.equal(chunked[1], one[1])
    check_lists_written_out(scores, seq_lens, chunked)


@pytest.mark.parametrize("score,stale", [("quest", -2 ** 31 + 1), ("gauss", 2 ** 31 - 1)])
def test_one_program_top_k_of_short_requests_in_a_wide_table(score, stale, monkeypatch):
    """A 256-block table in chunks of 16 (vLLM's tables are max_model_len wide) holding requests whose competing
    blocks end at a chunk's end, one past it, mid-chunk and at the table's end (16, 17, 32, 33, 100, 254 blocks).
    Each row's last competing block scores above the rest, and the key scratch starts with stale keys of the lowest
    or the highest value (as longer requests leave it): a search that stops a chunk short of a row's last competing
    block misses it, one that reads chunks it did not write counts stale keys. Lists equal to the one-chunk plan's
    and to the reference."""
    ends = torch.tensor([16, 17, 32, 33, 100, 254])
    case = make_case(seq_lens=((ends + 2) * 16 - 5).tolist(), max_blocks=256)
    last = case["block_table"][torch.arange(6), (ends - 1).to(DEVICE)].long()
    case["kmax"][last], case["kmin"][last] = 1e4, -1e4
    args = (case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"])
    one = plan_select(6, 2, 64, 256, **SIZES, score=score, device=DEVICE, num_q_heads=8)
    assert one.select_chunk == 256 and not one.radix_slice and not one.slices
    expected = [t.clone() for t in one.run(*args)]
    monkeypatch.setattr(block_select_triton, "_SELECT_CHUNK", 16)
    chunked = plan_select(6, 2, 64, 256, **SIZES, score=score, device=DEVICE, num_q_heads=8)
    chunked.keys.fill_(stale)
    sel_idx, sel_count = chunked.run(*args)
    check_selection(case, sel_idx, sel_count, score=score, **SIZES)
    assert (sel_idx.cpu() == (ends - 1)[:, None, None]).any(2).all()  # every row's last competing block
    assert torch.equal(sel_count, expected[1]) and torch.equal(sel_idx, expected[0])


def check_lists_written_out(scores, seq_lens, lists, sizes=SIZES):
    """Each row's lists are the rule written out: the windows, then the best middle blocks (highest score first,
    NaN above +inf, 0.0 above -0.0, ties to the lowest logical block), ascending."""

    def order(value: float) -> tuple:  # ascending = best first
        if value != value:
            return (0, 0.0, 0)
        return (1, -value, int(math.copysign(1.0, value) < 0))

    for b, seq_len in enumerate(seq_lens.tolist()):
        nb = min(-(-seq_len // sizes["block_size"]), scores.shape[2])
        count = naive_num_selected(nb, **sizes)
        middle = list(range(sizes["init_window"], nb - sizes["local_window"]))
        need = count - (nb - len(middle))
        for h in range(scores.shape[1]):
            best = sorted(middle, key=lambda j: (*order(float(scores[b, h, j])), j))[:need]
            expected = sorted(set(range(nb)) - set(middle) | set(best)) if count < nb else list(range(nb))
            assert lists[0][b, h, :count].tolist() == expected, (b, h)
            assert (lists[0][b, h, count:] == -1).all() and lists[1][b, h] == count, (b, h)


def hard_scores(batch: int, heads: int, blocks: int, seed: int = 11) -> torch.Tensor:
    """fp32 scores of random bit patterns (every exponent, both signs), a run of ties, equal pairs, a row of values
    a few ulps apart and NaNs of either sign: the inputs the top-k's search finds hardest."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-2 ** 31, 2 ** 31 - 1, (batch, heads, blocks), generator=gen, dtype=torch.int64)
    scores = scores.to(torch.int32).view(torch.float32).clone()
    scores[1, 1, :30] = 0.5  # a run of ties across the threshold
    scores[:, :, 7:9] = scores[:, :, 3:5]  # equal pairs
    one_ulps = torch.tensor(1.0).view(torch.int32) + torch.randint(0, 40, (blocks,), generator=gen, dtype=torch.int32)
    scores[0, 2] = one_ulps.view(torch.float32)
    for b, h, j, bits in ((0, 0, 10, -1), (3, 1, 5, -8388607), (1, 0, 20, 0x7F800001)):  # NaNs: -, -, +
        scores[b, h, j] = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    return scores


@pytest.mark.parametrize("chunk,blocks,finish", [(4, 60, 1024), (16, 60, 1024), (16, 40, 1024), (32, 60, 1024),
                                                  (64, 60, 1024), (16, 60, 4), (64, 60, 8)])
def test_kth_largest_search_over_scores_of_every_magnitude(chunk, blocks, finish, monkeypatch):
    """Scores of random fp32 bit patterns (every exponent, both signs, NaN of either sign, equal values) and a row of
    values a few ulps apart (only low bits differ): the search counts over the row while more than min(chunk,
    finish) keys are undecided, then finishes four bits at a time over those keys (chunk 64: at once; chunk 4 or a
    finish of 4 / 8 below the chunk: late, at a low bit or never). Tables of 2 and 3 chunks make the four-chunk scans
    read past the keys (masked). The lists are the rule written out at every chunk and finish size."""
    seq_lens = torch.tensor([955, 700, 403, 229, 60], dtype=torch.int32, device=DEVICE)
    scores = hard_scores(5, 3, blocks)
    monkeypatch.setattr(block_select_triton, "_SELECT_CHUNK", chunk)
    monkeypatch.setattr(block_select_triton, "_SELECT_FINISH", finish)
    lists = select_from_scores(scores.to(DEVICE), seq_lens, **SIZES)
    check_lists_written_out(scores, seq_lens, lists)


def test_plan_for_fewer_rows_shares_the_scratch_and_selects_like_a_fresh_plan():
    """``plan.for_rows(n)`` serves the first n requests (a smaller batch of the same step) with the plan's scratch:
    the lists of a plan made for n requests; a row count outside [0, batch] is refused naming ``rows``."""
    case = make_case()
    plan = plan_select(4, 2, 64, 28, **SIZES, device=DEVICE)
    small = plan.for_rows(2)
    assert small.batch == 2 and small.keys.data_ptr() == plan.keys.data_ptr()
    args = (case["q"][:2], case["kmin"], case["kmax"], case["kmean"], case["block_table"][:2], case["seq_lens"][:2])
    fresh = plan_select(2, 2, 64, 28, **SIZES, device=DEVICE).run(*args)
    got = small.run(*args)
    assert torch.equal(got[0], fresh[0]) and torch.equal(got[1], fresh[1])
    for rows in (5, -1, 1.5):
        with pytest.raises(ValueError, match=r"rows: got .*expected an int in \[0, 4\]"):
            plan.for_rows(rows)


def sliced_plans(monkeypatch, slice_blocks: int, min_prune: int) -> None:
    """Plans made from here on cut rows into slices of ``slice_blocks`` wherever each slice keeps at most
    ``1 / min_prune`` of its blocks (on a GPU: slices of 1024, a quarter) and their programs fit 132 SMs (an
    H100's; the interpreter counts as one SM)."""
    monkeypatch.setattr(block_select_sliced, "SLICE", slice_blocks)
    monkeypatch.setattr(block_select_sliced, "MIN_PRUNE", min_prune)
    monkeypatch.setattr(block_select_triton, "sm_count", lambda device: 132)


@pytest.mark.parametrize("slice_blocks,min_prune,sizes", [
    (16, 2, dict(SIZES, token_budget=100)),  # 7 blocks a list: 4 slices keep 8 candidates each
    (32, 1, SIZES),  # ratio 0.3: 18 blocks a list of 60, slices that keep every competing block they hold
    (16, 1, dict(SIZES, init_window=0, local_window=1, min_blocks=1, token_budget=200)),  # no window but the last
])
def test_sliced_top_k_writes_the_rule_and_the_one_program_lists(slice_blocks, min_prune, sizes, monkeypatch):
    """The sliced top-k (each slice keeps its best, the row's last to finish merges) over the search's hardest
    scores (random bit patterns, ties, ulps, NaNs of either sign), ragged requests (one dense): the rule written out,
    and exactly the one-program kernel's lists and counts."""
    seq_lens = torch.tensor([955, 700, 403, 229, 60], dtype=torch.int32, device=DEVICE)
    scores = hard_scores(5, 3, 60).to(DEVICE)
    one = select_from_scores(scores, seq_lens, **sizes)
    sliced_plans(monkeypatch, slice_blocks, min_prune)
    width = selection_width(60, **sizes)
    assert block_select_sliced.choose_slicing(60, width, 15, 132, sliceable=True) == -(-60 // slice_blocks)
    lists = select_from_scores(scores, seq_lens, **sizes)
    check_lists_written_out(scores.cpu(), seq_lens.cpu(), [t.cpu() for t in lists], sizes)
    assert torch.equal(lists[0], one[0]) and torch.equal(lists[1], one[1])


def test_sliced_top_k_reselects_named_rows_into_sel_rows(monkeypatch):
    """Through a plan (quest scores from reprs, windows, a 2-block request that is dense): rows reselected into the
    rows sel_rows names get the one-program lists, the others keep what they held; each launch leaves its arrival
    counts at zero for the next."""
    case = make_case(seq_lens=[955, 17, 403, 700], max_blocks=60)
    sizes = dict(SIZES, token_budget=120)
    args = (case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"])
    ref_idx, ref_count = plan_select(4, 2, 64, 60, **sizes, device=DEVICE).run(*args)
    sliced_plans(monkeypatch, 16, 2)
    plan = plan_select(4, 2, 64, 60, **sizes, device=DEVICE)
    assert plan.slices == 4 and plan.candidates.shape == (4, 2, 4, 2, 8) and plan.keys.shape[2] == 0
    check_kept_rows(plan, case, ref_idx, ref_count)
    assert (plan.arrivals == 0).all()


def check_kept_rows(plan, case: dict, ref_idx: torch.Tensor, ref_count: torch.Tensor) -> None:
    """``plan`` run over ``case`` (4 requests) reselecting rows 0, 1 and 3 into rows 5, 1 and 0 of a 6-row out:
    those get the reference lists, every other row keeps its 77s; ``plan.for_rows(2)`` gives the first two."""
    args = (case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"])
    slots = torch.tensor([5, 1, 3, 0], device=DEVICE)
    out = (torch.full((6, 2, ref_idx.shape[2]), 77, dtype=torch.int32, device=DEVICE),
           torch.full((6, 2), 77, dtype=torch.int32, device=DEVICE))
    plan.run(*args, out=out, sel_rows=slots, reselect=torch.tensor([1, 1, 0, 1], dtype=torch.int32, device=DEVICE))
    for b, slot in enumerate(slots.tolist()):
        assert torch.equal(out[0][slot], ref_idx[b] if b != 2 else torch.full_like(ref_idx[b], 77))
        assert torch.equal(out[1][slot], ref_count[b] if b != 2 else torch.full_like(ref_count[b], 77))
    assert (out[0][[2, 4]] == 77).all() and (out[1][[2, 4]] == 77).all()
    got = plan.for_rows(2).run(case["q"][:2], case["kmin"], case["kmax"], case["kmean"], case["block_table"][:2],
                               case["seq_lens"][:2])
    assert torch.equal(got[0], ref_idx[:2]) and torch.equal(got[1], ref_count[:2])


@pytest.mark.parametrize("max_blocks,width,rows,sliceable,slices", [
    (8192, 128, 8, True, 8),  # 1 x 128K at a 2048-token budget (8 KV heads)
    (8198, 128, 8, True, 9),  # ... a few tokens into decode
    (2048, 128, 16, True, 2),  # 2 x 32K at the same budget
    (8192, 2459, 8, True, 0),  # ratio 0.3: a slice would keep every block it holds
    (8192, 128, 8, False, 0),  # the gauss rule: shares need the whole row
    (1024, 64, 8, True, 0),  # one slice: the one-program path
    (65536, 128, 8, True, 0),  # 64 slices x 128 candidates: more than the merge holds
    (8192, 128, 64, True, 0),  # 8 x 128K: 64 rows fill the GPU, slices would not fit one wave
])
def test_the_sliced_top_k_is_planned_where_it_prunes_and_fits_a_wave(max_blocks, width, rows, sliceable, slices):
    assert block_select_sliced.choose_slicing(max_blocks, width, rows, 132, sliceable) == slices


def radix_plans(monkeypatch, min_slice: int) -> None:
    """Plans made from here on take the radix top-k wherever rows of slices of ``min_slice`` blocks or more (at
    most 8 a row, on a GPU of at least 256) fit 132 SMs."""
    monkeypatch.setattr(block_select_radix, "MIN_BLOCKS", 1)
    monkeypatch.setattr(block_select_radix, "ROWS", tuple(1 << n for n in range(15)))
    monkeypatch.setattr(block_select_radix, "MIN_SLICE", min_slice)
    monkeypatch.setattr(block_select_triton, "sm_count", lambda device: 132)


def equal_and_spread_scores(blocks: int) -> torch.Tensor:
    """[5, 3, blocks] fp32: rows of one value (every competing key ties), of two values, of values a few ulps apart
    across slices, and of the hard bit patterns (every exponent, both signs, NaNs)."""
    scores = hard_scores(5, 3, blocks, seed=5)
    scores[2, 0] = 1.5
    scores[2, 1] = torch.where(torch.arange(blocks) % 3 == 0, 2.0, -2.0)
    scores[4, 2] = (torch.tensor(7.0).view(torch.int32) + torch.arange(blocks, dtype=torch.int32) % 9).view(
        torch.float32)
    return scores


@pytest.mark.parametrize("min_slice,sizes", [
    (8, SIZES),  # ratio 0.3: 18 blocks of 60, eight slices of 8
    (16, SIZES),  # four slices
    (8, dict(SIZES, init_window=0, local_window=1, min_blocks=1, token_budget=400)),  # no window but the last
    (32, dict(SIZES, sparse_ratio=0.7)),  # two slices, most blocks picked
])
def test_radix_top_k_writes_the_rule_and_the_one_program_lists(min_slice, sizes, monkeypatch):
    """The radix top-k (every slice program finds the row's threshold by histograms of the next 8 bits, then
    writes its part) over the search's hardest scores (random bit patterns, NaNs of either sign, ulps apart, one
    value, two values), ragged requests (one dense): the rule written out, and exactly the one-program kernel's
    lists and counts."""
    seq_lens = torch.tensor([955, 700, 403, 229, 60], dtype=torch.int32, device=DEVICE)
    scores = equal_and_spread_scores(60).to(DEVICE)
    one = select_from_scores(scores, seq_lens, **sizes)
    radix_plans(monkeypatch, min_slice)
    assert block_select_radix.choose_radix(60, 15, 132, sliceable=True) == min_slice
    plan = block_select_triton._make_plan(5, 3, 1, 60, scores.device, sizes["block_size"], sizes["sparse_ratio"],
                                          sizes["init_window"], sizes["local_window"], sizes["min_blocks"], "quest",
                                          sizes.get("token_budget"), scores=scores)
    assert plan.radix_slice == min_slice and plan.slices == 0 and plan.keys.shape[2] == 0
    lists = select_from_scores(scores, seq_lens, **sizes)
    check_lists_written_out(scores.cpu(), seq_lens.cpu(), [t.cpu() for t in lists], sizes)
    assert torch.equal(lists[0], one[0]) and torch.equal(lists[1], one[1])


@pytest.mark.parametrize("cuts,sizes", [((2, 4, 16), (128, 64, 16)), ((4,), (64, 0, 0)), ((2, 16), (128, 16, 0))])
def test_radix_top_k_searches_a_short_request_in_a_row_cut_to_it(cuts, sizes, monkeypatch):
    """Requests in a wide table (256 blocks, as a vLLM engine's tables are wide), the row cut by each chain of cuts
    (CUTS given for rows of 256 keys; three cuts: 128, 64 and 16 keys): competing blocks ending
    at 10 and 16, 17 and 64, 65 and 128, and 129, each searched in the shortest row that holds them, over ties,
    near-ties and hard bit patterns: the rule written out, and exactly the one-program kernel's lists and
    counts."""
    blocks = torch.tensor([12, 18, 19, 66, 67, 130, 131], dtype=torch.int32)  # competing blocks end 2 before
    scores = torch.cat([equal_and_spread_scores(256), hard_scores(4, 3, 256, seed=8)[:2]])
    scores[torch.arange(7), :, blocks - 3] = 3e38  # each row's last competing block is picked: a cut one short shows
    scores = scores.to(DEVICE)
    seq_lens = (blocks * 16).to(DEVICE)
    one = select_from_scores(scores, seq_lens, **SIZES)
    radix_plans(monkeypatch, 64)
    assert block_select_radix.choose_radix(256, 21, 132, sliceable=True) == 64  # 4 slices a row: radix planned
    monkeypatch.setattr(block_select_radix, "CUTS", {256: cuts})
    assert block_select_radix.cut_rows(256) == sizes
    lists = select_from_scores(scores, seq_lens, **SIZES)
    check_lists_written_out(scores.cpu(), seq_lens.cpu(), [t.cpu() for t in lists])
    assert torch.equal(lists[0], one[0]) and torch.equal(lists[1], one[1])


@pytest.mark.parametrize("row,cuts", [(8192, (2048, 512, 0)), (4096, (2048, 1024, 256)), (2048, (0, 0, 0)),
                                      (16384, (0, 0, 0))])
def test_radix_rows_of_4096_and_8192_keys_are_cut(row, cuts):
    """Rows of 8192 keys by 4 and 16 (a half-length search beside the full one cost it 2.9 us), of 4096 by 2, 4
    and 16, no others."""
    assert block_select_radix.cut_rows(row) == cuts


@pytest.mark.parametrize("cuts,sizes", [((), (0, 0, 0)), ((4,), (2048, 0, 0)), ((2, 16), (4096, 512, 0))])
def test_radix_rows_are_cut_as_cuts_says(cuts, sizes, monkeypatch):
    monkeypatch.setattr(block_select_radix, "CUTS", {8192: cuts})
    assert block_select_radix.cut_rows(8192) == sizes


@pytest.mark.parametrize("cuts", [(1, 4), (4, 4, 16), (16, 4), (2, 4, 8, 16), (3,), (16384,), (2.0,)])
def test_radix_cuts_that_are_not_ascending_powers_of_two_name_the_setting(cuts, monkeypatch):
    monkeypatch.setattr(block_select_radix, "CUTS", {8192: cuts})
    with pytest.raises(ValueError, match=r"radix\.CUTS\[8192\]=.*ascending powers of two in \(1, 8192\]"):
        block_select_radix.cut_rows(8192)


def test_radix_top_k_reselects_named_rows_into_sel_rows(monkeypatch):
    """Through a plan (Quest scores from reprs, windows, a 2-block request that is dense): rows reselected into the
    rows sel_rows names get the one-program lists, the others keep what they held; a plan for fewer rows selects
    like a fresh one."""
    case = make_case(seq_lens=[955, 17, 403, 700], max_blocks=60)
    args = (case["q"], case["kmin"], case["kmax"], case["kmean"], case["block_table"], case["seq_lens"])
    ref_idx, ref_count = plan_select(4, 2, 64, 60, **SIZES, device=DEVICE).run(*args)
    radix_plans(monkeypatch, 16)
    plan = plan_select(4, 2, 64, 60, **SIZES, device=DEVICE)
    assert plan.radix_slice == 16 and plan.slices == 0
    check_kept_rows(plan, case, ref_idx, ref_count)


@pytest.mark.parametrize("max_blocks,rows,sliceable,slice_blocks", [
    (8192, 8, True, 1024),  # 1 x 128K (8 KV heads): 8 slices
    (4097, 8, True, 1024),  # the shortest table of rows of 8192 keys: 5 slices
    (4096, 8, True, 512),  # 1 x 64K: rows of 4096 keys (1 us slower at full length, faster cut to a short request)
    (2049, 8, True, 512),  # the shortest table of rows of 4096 keys: 5 slices
    (2048, 8, True, 256),  # 1 x 32K: rows of 2048 keys, the shortest table timed
    (8192, 16, True, 1024),  # 2 x 128K: 128 programs
    (8192, 64, True, 0),  # 8 x 128K: 64 rows fill the GPU, slices would not fit one wave
    (8192, 8, False, 0),  # the gauss rule: shares need the whole row
    (8198, 8, True, 0),  # a few tokens past 128K: rows of 16384 keys, timed slower than one program
    (2047, 8, True, 0),  # shorter tables: not timed
])
def test_the_radix_top_k_is_planned_where_slices_fit_a_wave(max_blocks, rows, sliceable, slice_blocks):
    """Where the radix top-k is planned: tables from 2048 blocks in rows of 2048, 4096 or 8192 keys, where it was timed
    faster than one program a row, whose slices fit a wave of 132 SMs."""
    assert block_select_radix.choose_radix(max_blocks, rows, 132, sliceable) == slice_blocks


@pytest.mark.parametrize("max_blocks,slice_blocks", [(256, 0), (300, 256), (2048, 256), (16384, 2048)])
def test_the_radix_slices_are_sized_by_the_table(max_blocks, slice_blocks, monkeypatch):
    """With the table limits lifted: slices of at least 256 blocks, at most eight, at least two."""
    monkeypatch.setattr(block_select_radix, "MIN_BLOCKS", 1)
    monkeypatch.setattr(block_select_radix, "ROWS", tuple(1 << n for n in range(15)))
    assert block_select_radix.choose_radix(max_blocks, 8, 132, True) == slice_blocks
