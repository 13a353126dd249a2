"""GSA on-device mode (ucm_sparse.gsa, ucm_sparse.ops, ucm_sparse.reprs): plan/run reuse, window invariants, dense
equivalence, per-request state, the torch twins against the kernels' references, the Triton backend against the
torch one, representations refreshed where keys changed."""
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucm_kernels.block_repr import empty_block_repr, naive_update_block_repr
from ucm_kernels.block_select import naive_select_blocks, torch_block_scores, torch_select_blocks
from ucm_kernels.sparse_decode import torch_sparse_decode
from ucm_kernels.sparse_decode.naive import naive_dense_decode, naive_sparse_decode
from ucm_sparse import GSA, GSAConfig, sparse_attention
from ucm_sparse import ops
from ucm_sparse.reprs import BlockReprCache

from paged_kv import TOLERANCE, make_paged_kv

BLOCK = 16
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels take CUDA tensors only
CONFIG = GSAConfig(sparse_ratio=0.3, init_window_sz=1, local_window_sz=2, min_blocks=3)


def make_paged(seq_lens, kv_heads=2, group=4, head_dim=32, dtype=torch.float32, seed=0):
    """q, K, V and a block table on the CPU (:func:`make_paged_kv` with this file's block size, two spare table
    columns and five spare blocks)."""
    q, k, v, table, _ = make_paged_kv(seq_lens, kv_heads * group, kv_heads, head_dim, dtype, block_size=BLOCK,
                                      spare_blocks=5, spare_columns=2, seed=seed)
    return q, k, v, table


def check_windows(selection, seq_lens, config, max_blocks):
    """Per (request, head): ascending distinct blocks of the context, the count GSA promises, both windows."""
    local = max(config.local_window_sz, 1)
    for b, n in enumerate(seq_lens):
        nb = -(-n // BLOCK)
        count = ops.num_selected(nb, config, BLOCK)
        for h in range(selection.sel_idx.shape[1]):
            blocks = selection.blocks(b, h)
            assert len(blocks) == count and blocks == sorted(set(blocks))
            assert set(blocks) <= set(range(nb))
            assert set(range(min(config.init_window_sz, nb))) <= set(blocks)
            assert set(range(max(nb - local, 0), nb)) <= set(blocks)
            assert (selection.sel_idx[b, h, count:] == -1).all()
    assert selection.sel_idx.shape[2] == ops.num_selected(max_blocks, config, BLOCK)


@settings(max_examples=25, deadline=None)
@given(seq_lens=st.lists(st.integers(1, 700), min_size=1, max_size=4), ratio=st.sampled_from([0.1, 0.3, 0.5, 1.0]),
       init=st.integers(0, 3), local=st.integers(0, 4), min_blocks=st.integers(1, 12),
       score=st.sampled_from(["quest", "mean", "gauss"]), budget=st.sampled_from([None, 64, 200]))
def test_selection_keeps_windows_and_count(seq_lens, ratio, init, local, min_blocks, score, budget):
    config = GSAConfig(sparse_ratio=ratio, init_window_sz=init, local_window_sz=local, min_blocks=min_blocks,
                       score=score, token_budget=budget)
    q, k, v, table = make_paged(seq_lens)
    out, selection = sparse_attention(q, k, v, table, seq_lens, config)
    check_windows(selection, seq_lens, config, max(-(-n // BLOCK) for n in seq_lens))
    assert torch.isfinite(out).all()


def test_torch_gauss_scores_name_the_missing_softmax_domain():
    q, k, _, table = make_paged([100])
    reprs = empty_block_repr(k)
    with pytest.raises(ValueError, match="full: required by score='gauss'"):
        torch_block_scores(q, *reprs, table[:, :7], "gauss")


@pytest.mark.parametrize("score", ["quest", "mean", "gauss"])
def test_chosen_blocks_outscore_the_rest(score):
    seq_lens = [700, 310, 45]
    config = GSAConfig(sparse_ratio=0.2, init_window_sz=1, local_window_sz=3, min_blocks=2, score=score)
    q, k, v, table = make_paged(seq_lens)
    _, selection = sparse_attention(q, k, v, table, seq_lens, config)
    reprs = empty_block_repr(k)
    naive_update_block_repr(k, table[:, :44].flatten(), *reprs)
    full = torch.arange(44) < torch.tensor(seq_lens)[:, None] // BLOCK
    scores = torch_block_scores(q, *reprs, table[:, :44], score, full=full)
    for b, n in enumerate(seq_lens):
        nb = -(-n // BLOCK)
        competing = set(range(1, nb - 3))
        for h in range(2):
            chosen = set(selection.blocks(b, h)) & competing
            rest = competing - chosen
            if chosen and rest:
                assert min(scores[b, h, j] for j in chosen) >= max(scores[b, h, j] for j in rest)


def test_ratio_one_is_dense_attention():
    seq_lens = [600, 33, 250]
    q, k, v, table = make_paged(seq_lens)
    gsa = GSA(GSAConfig(sparse_ratio=1.0), block_size=BLOCK)
    plan = gsa.plan(["a", "b", "c"], seq_lens, table)
    assert plan.dense
    out = gsa.run(plan, 0, q, k, v)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    torch.testing.assert_close(out, naive_dense_decode(q, k, v, table, lens), **TOLERANCE[torch.float32])
    full = ops.full_selection(lens, 2, BLOCK, plan.block_table.shape[1])
    assert torch.equal(out, torch_sparse_decode(q, k, v, plan.block_table, lens, full.sel_idx, full.sel_count))


def test_short_sequences_stay_dense_and_long_ones_go_sparse():
    seq_lens = [40, 900]
    q, k, v, table = make_paged(seq_lens)
    _, selection = sparse_attention(q, k, v, table, seq_lens, CONFIG)
    assert selection.sel_count[0].tolist() == [3, 3]  # 3 blocks <= min_blocks: all of them
    assert selection.sel_count[1].tolist() == [ops.num_selected(57, CONFIG, BLOCK)] * 2 == [18, 18]


def test_one_plan_serves_every_layer_and_a_selection_is_reused(monkeypatch):
    seq_lens = [500, 260]
    q, k, v, table = make_paged(seq_lens)
    q2 = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    gsa = GSA(CONFIG, block_size=BLOCK)
    plan = gsa.plan([1, 2], seq_lens, table)
    calls = Counter()
    for name in ("select", "update_reprs"):
        monkeypatch.setattr(ops, name, counted(getattr(ops, name), name, calls))
    out0 = gsa.run(plan, 0, q, k, v)
    out1 = gsa.run(plan, 1, q2, k, v)
    reused = gsa.run(plan, 2, q2, k, v, selection=plan.selections[0])
    assert calls == {"select": 2, "update_reprs": 3}
    assert plan.selections[2] is plan.selections[0]
    expected = torch_sparse_decode(q2, k, v, plan.block_table, plan.seq_lens, plan.selections[0].sel_idx,
                                       plan.selections[0].sel_count)
    assert torch.equal(reused, expected)
    assert not torch.equal(out0, out1)
    assert plan.filled.tolist() == table[0, :31].tolist() + table[1, :16].tolist()


def test_first_layers_stay_dense_and_keep_no_summaries(monkeypatch):
    seq_lens = [500, 260]
    q, k, v, table = make_paged(seq_lens)
    config = GSAConfig(sparse_ratio=0.3, init_window_sz=1, local_window_sz=2, min_blocks=3, dense_first_layers=2)
    gsa = GSA(config, block_size=BLOCK)
    plan = gsa.plan([1, 2], seq_lens, table)
    calls = Counter()
    for name in ("select", "update_reprs"):
        monkeypatch.setattr(ops, name, counted(getattr(ops, name), name, calls))
    dense = [gsa.run(plan, layer, q, k, v) for layer in (0, 1)]
    sparse = [gsa.run(plan, layer, q, k, v) for layer in (2, "named")]
    assert calls == {"select": 2, "update_reprs": 2} and set(gsa._reprs) == {2, "named"}
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    for layer, out in zip((0, 1), dense):
        assert plan.selections[layer].sel_count.tolist() == [[32, 32], [17, 17]]  # every block (of 16 tokens)
        torch.testing.assert_close(out, naive_dense_decode(q, k, v, table, lens), **TOLERANCE[torch.float32])
    expected, _ = sparse_attention(q, k, v, table, seq_lens, config)
    assert torch.equal(sparse[0], expected) and torch.equal(sparse[1], expected)
    assert plan.selections[2].sel_count.tolist() == [[10, 10], [6, 6]]


def test_sparse_layer_reads_only_int_layer_indices():
    config = GSAConfig(dense_first_layers=2)
    assert [config.sparse_layer(x) for x in (0, 1, 2, None, "0", True)] == [False, False, True, True, True, True]
    assert GSAConfig().dense_first_layers == 0 and GSAConfig().sparse_layer(0)


def counted(function, name: str, calls: Counter):
    """``function`` that also counts its calls in ``calls[name]``."""
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return wrapper


def test_stale_plan_is_refused():
    q, k, v, table = make_paged([300])
    gsa = GSA(CONFIG, block_size=BLOCK)
    old = gsa.plan(["r"], [300], table)
    gsa.plan(["r"], [300], table)
    with pytest.raises(ValueError, match="plan is from step 1"):
        gsa.run(old, 0, q, k, v)


def test_decode_loop_state_matches_one_shot_attention():
    """A request grows token by token, another joins, one finishes and its blocks go to a new request."""
    q, k, v, table = make_paged([640, 640, 640], seed=3)
    gsa = GSA(CONFIG, block_size=BLOCK)
    schedule = [(["a", "b"], [300, 95]), (["a", "b"], [301, 96]), (["a", "b", "c"], [302, 97, 200]),
                (["a", "c"], [303, 201]), (["d", "a", "c"], [150, 304, 202])]
    rows = {"a": 0, "b": 1, "c": 2, "d": 1}  # "d" takes the finished "b"'s physical blocks
    for ids, lens in schedule:
        if "d" in ids:
            gsa.finish("b")
            for cache in (k, v):  # "d" writes its own tokens into "b"'s old blocks
                cache[table[1, :10].long()] = torch.randn(10, BLOCK, 2, 32)
        batch_table = table[[rows[i] for i in ids]]
        plan = gsa.plan(ids, lens, batch_table)
        queries = q[[rows[i] for i in ids]]
        out = gsa.run(plan, "layer", queries, k, v)
        expected, selection = sparse_attention(queries, k, v, batch_table, lens, CONFIG)
        assert torch.equal(out, expected)
        assert torch.equal(plan.selections["layer"].sel_idx, selection.sel_idx)
    assert "b" not in gsa.requests and len(gsa.requests) == 3


@pytest.mark.parametrize("backend,device,dtype", [("torch", "cpu", torch.float32),
                                                  ("triton", TRITON_DEVICE, torch.bfloat16)])
def test_select_every_reuses_a_requests_lists_across_reordered_batches(backend, device, dtype):
    """select_every=3 over a schedule where rows reorder, a request joins, one leaves and a new one takes its
    slot, with new queries each step: a request reselects when new, when a block fills or when its lists are 3
    steps old, else it attends the lists it chose before; every output is attention over the lists in use."""
    q_all, k, v, table = (t.to(device) for t in make_paged([640, 640, 640], dtype=dtype, seed=3))
    config = GSAConfig(**{**vars(CONFIG), "select_every": 3})
    gsa = GSA(config, block_size=BLOCK, backend=backend)
    rows = {"a": 0, "b": 1, "c": 2, "d": 1}
    schedule = [(["a", "b"], [300, 95], [1, 1]), (["b", "a"], [96, 301], [0, 0]),
                (["a", "b", "c"], [302, 97, 200], [0, 1, 1]),  # b's 97th token fills a block; c is new
                (["a", "c"], [303, 201], [1, 0]),  # a's lists are 3 steps old
                (["d", "a", "c"], [150, 304, 202], [1, 0, 0])]  # d takes b's slot
    gen = torch.Generator().manual_seed(4)
    in_use = {}
    for ids, lens, wanted in schedule:
        if "d" in ids:
            gsa.finish("b")
        batch_table = table[[rows[i] for i in ids]]
        queries = torch.randn(len(ids), *q_all.shape[1:], generator=gen).to(dtype).to(device)
        plan = gsa.plan(ids, lens, batch_table)
        assert plan.reuse.reselect == wanted
        out = gsa.run(plan, "layer", queries, k, v)
        _, fresh = sparse_attention(queries, k, v, batch_table, lens, config, backend=backend)
        used = plan.selections["layer"]
        for b, (request, again) in enumerate(zip(ids, wanted)):
            expected = [fresh.blocks(b, h) for h in range(2)] if again else in_use[request]
            in_use[request] = [used.blocks(b, h) for h in range(2)]
            assert in_use[request] == expected, (ids, request)
        expected_out = ops.attend("torch", queries.cpu(), k.cpu(), v.cpu(), batch_table.cpu(),
                                  torch.tensor(lens), ops.Selection(used.sel_idx.cpu(), used.sel_count.cpu()), None)
        torch.testing.assert_close(out.cpu(), expected_out, **TOLERANCE[dtype])
    assert in_use["a"] != [fresh.blocks(1, h) for h in range(2)]  # the reused lists are not what a fresh pick gives


@pytest.mark.parametrize("drift", [None, 0.5])
def test_attention_is_told_its_inputs_are_ready_where_no_list_was_written_this_step(monkeypatch, drift):
    """``inputs_ready`` reaches attention for a dense layer, and for a sparse layer whose kept lists are read in
    place (no row reselects, slots in order, no drift rule); never where lists were selected, copied or given."""
    calls = []
    real_attend = ops.attend
    monkeypatch.setattr(ops, "attend", lambda *a, **k: calls.append(k["inputs_ready"]) or real_attend(*a, **k))
    q, k, v, table = make_paged([300, 390], seed=6)
    gsa = GSA(GSAConfig(**{**vars(CONFIG), "select_every": 4, "dense_first_layers": 1, "select_drift": drift}),
              block_size=BLOCK)
    kept = drift is None
    for ids, lens, wanted in [(["a", "b"], [300, 390], [True, False, False]),  # layer 1 selects
                              (["a", "b"], [301, 391], [True, kept, False]),  # kept lists read in place
                              (["b", "a"], [392, 302], [True, False, False]),  # slots out of order: a copy
                              (["a", "b"], [303, 393], [True, kept, False]),  # in place again
                              (["a", "b"], [304, 394], [True, False, False])]:  # served 4 steps: reselect
        rows = [["a", "b"].index(i) for i in ids]
        plan = gsa.plan(ids, lens, table[rows])
        calls.clear()
        for layer in (0, 1):
            gsa.run(plan, layer, q[rows], k, v)
        gsa.run(plan, 2, q[rows], k, v, selection=plan.selections[1])
        assert calls == wanted, (ids, lens)


def test_a_layer_that_missed_a_step_reselects():
    """Layer 0 runs at every step and reuses its first lists; layer 1 sits out step 1, so at step 2 it selects
    afresh (with its own new queries) although the plan lets the rows reuse."""
    q, k, v, table = make_paged([300, 390], seed=5)
    gsa = GSA(GSAConfig(**{**vars(CONFIG), "select_every": 4}), block_size=BLOCK)
    for step in range(3):
        plan = gsa.plan(["a", "b"], [300 + step, 390 + step], table)
        gsa.run(plan, 0, q * (step + 1), k, v)
        if step != 1:
            gsa.run(plan, 1, q * (step - 1), k, v)
        if step == 0:
            layer0_first = plan.selections[0].sel_idx.clone()
    assert plan.reuse.reselect == [0, 0]
    assert torch.equal(plan.selections[0].sel_idx, layer0_first)
    _, fresh = sparse_attention(q, k, v, table, [302, 392], gsa.config)
    _, stale = sparse_attention(-q, k, v, table, [302, 392], gsa.config)
    assert torch.equal(plan.selections[1].sel_idx, fresh.sel_idx) and not torch.equal(fresh.sel_idx, stale.sel_idx)


def test_two_stage_selection_keeps_the_candidates_of_most_exact_attention():
    """rerank_candidates C: the kept blocks are the windows plus the candidates (Quest at C x the ratio) whose
    tokens get the most softmax mass from the KV head's query heads, the one-stage count in all; with every block
    a candidate that is the exact top of the whole context."""
    seq_lens = [700, 300]
    q, k, v, table = make_paged(seq_lens, seed=7)
    k, v = (torch.nan_to_num(t) for t in (k, v))
    for factor in (2.0, 10.0):
        config = GSAConfig(**{**vars(CONFIG), "rerank_candidates": factor})
        _, chosen = sparse_attention(q, k, v, table, seq_lens, config, backend="torch")
        _, wide = sparse_attention(q, k, v, table, seq_lens, GSAConfig(**{**vars(CONFIG), "sparse_ratio": min(
            1.0, 0.3 * factor)}), backend="torch")
        for b, n in enumerate(seq_lens):
            nb = -(-n // BLOCK)
            logits = torch.einsum("hgd,thd->hgt", q[b].view(2, 4, 32), k[table[b, :nb].long()].flatten(0, 1)) \
                * 32 ** -0.5
            mass = torch.softmax(logits[:, :, :n], dim=-1).sum(1)
            per_block = torch.nn.functional.pad(mass, (0, nb * BLOCK - n)).view(2, nb, BLOCK).sum(-1)
            for h in range(2):
                candidates = wide.blocks(b, h)
                windows = {0} | set(range(nb - 2, nb))
                count = ops.num_selected(nb, CONFIG, BLOCK)
                rest = sorted((j for j in candidates if j not in windows), key=lambda j: -float(
                    per_block[h, j] if factor > 5 else 0))
                kept = chosen.blocks(b, h)
                assert len(kept) == count and windows <= set(kept) and set(kept) <= set(candidates)
                if factor > 5:  # every block a candidate: the exact top
                    assert set(kept) == windows | set(rest[:count - len(windows)])


def test_two_stage_selection_needs_the_keys():
    q, k, v, table = make_paged([700], dtype=torch.bfloat16)
    config = GSAConfig(**{**vars(CONFIG), "rerank_candidates": 2.0})
    reprs = ops.empty_reprs(k.shape[0], 2, 32, k.dtype, config, "cpu")
    with pytest.raises(ValueError, match="key_cache: required"):
        ops.select("torch", q, reprs, table, torch.tensor([700]), config, BLOCK)


def test_restarted_request_recomputes_its_blocks():
    q, k, v, table = make_paged([400])
    gsa = GSA(CONFIG, block_size=BLOCK)
    gsa.run(gsa.plan(["r"], [400], table), 0, q, k, v)
    k[table[0, 3].long()] = torch.randn(BLOCK, 2, 32)  # preempted: the block is rewritten, the request restarts
    plan = gsa.plan(["r"], [80], table)
    assert plan.filled.tolist() == table[0, :5].tolist()
    out = gsa.run(plan, 0, q, k, v)
    assert torch.equal(out, sparse_attention(q, k, v, table, [80], CONFIG)[0])


@pytest.mark.parametrize("repr_dtype", ["cache", "fp8"])
def test_torch_twins_match_the_kernel_references(repr_dtype):
    seq_lens = [403, 17, 150, 229]
    q, k, v, table = make_paged(seq_lens, dtype=torch.bfloat16)
    ids = torch.cat([table[b, :n // BLOCK] for b, n in enumerate(seq_lens)])
    config = GSAConfig(repr_dtype=repr_dtype)
    reprs = ops.empty_reprs(k.shape[0], 2, 32, k.dtype, config, "cpu")
    assert [r.dtype for r in reprs] == ([torch.bfloat16] * 3 if repr_dtype == "cache"
                                        else [torch.float8_e4m3fn] * 3 + [torch.float32])
    ops.update_reprs("torch", k, ids, reprs)
    kscale = reprs[3] if repr_dtype == "fp8" else None
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    sizes = dict(block_size=BLOCK, sparse_ratio=0.3, init_window=1, local_window=2, min_blocks=3)
    for score in ("quest", "mean", "gauss"):
        sel = torch_select_blocks(q, *reprs[:3], table[:, :26], lens, score=score, kscale=kscale, **sizes)
        ref = naive_select_blocks(q, *reprs[:3], table[:, :26], lens, score=score, kscale=kscale, **sizes)
        assert torch.equal(sel[0], ref[0]) and torch.equal(sel[1], ref[1])
    out = torch_sparse_decode(q, k, v, table, lens, *sel)
    torch.testing.assert_close(out.float(), naive_sparse_decode(q, k, v, table, lens, *sel),
                               **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("repr_dtype,rerank", [("cache", 1.0), ("fp8", 1.0), ("cache", 2.0), ("fp8", 3.0)])
def test_triton_backend_matches_torch_backend(repr_dtype, rerank):
    """The Triton backend on TRITON_DEVICE (compiled on a GPU, the interpreter on a CPU) against the torch backend
    on the CPU, in one stage and in two (the second stage's block masses from ucm_kernels.block_mass)."""
    seq_lens = [300, 70]
    q, k, v, table = make_paged(seq_lens, kv_heads=2, group=2, head_dim=16, dtype=torch.bfloat16)
    config = GSAConfig(**{**vars(CONFIG), "repr_dtype": repr_dtype, "rerank_candidates": rerank})
    on_device = [t.to(TRITON_DEVICE) for t in (q, k, v, table)]
    out_t, sel_t = sparse_attention(*on_device, seq_lens, config, backend="triton")
    out_c, sel_c = sparse_attention(q, k, v, table, seq_lens, config, backend="torch")
    assert out_t.device.type == sel_t.sel_idx.device.type == TRITON_DEVICE
    assert torch.equal(sel_t.sel_count.cpu(), sel_c.sel_count)
    assert torch.equal(sel_t.sel_idx.cpu(), sel_c.sel_idx)
    torch.testing.assert_close(out_t.cpu(), out_c, **TOLERANCE[torch.bfloat16])


def test_a_steps_layers_share_launch_plans_and_get_the_same_outputs():
    """ops.select and ops.attend with the step's plans dict: the first call of a shape plans it, later ones reuse
    that plan, and every output equals the call that plans for itself (bit for bit: the same plan)."""
    seq_lens = [300, 70]
    q, k, v, table = (t.to(TRITON_DEVICE) for t in make_paged(seq_lens, dtype=torch.bfloat16))
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=TRITON_DEVICE)
    reprs = ops.empty_reprs(k.shape[0], k.shape[2], k.shape[3], k.dtype, CONFIG, TRITON_DEVICE)
    ops.update_reprs("triton", torch.nan_to_num(k), table.flatten(), reprs)
    selection = ops.select("triton", q, reprs, table, lens, CONFIG, BLOCK)
    plans = {}
    for _ in range(2):  # two layers of one step
        shared = ops.select("triton", q, reprs, table, lens, CONFIG, BLOCK, plans=plans)
        assert torch.equal(shared.sel_idx, selection.sel_idx) and torch.equal(shared.sel_count, selection.sel_count)
    for chosen in (selection, None, selection, None):  # sparse and dense layers of one step
        shared = ops.attend("triton", q, k, v, table, lens, chosen, None, plans)
        alone = ops.attend("triton", q, k, v, table, lens, chosen, None)
        assert torch.equal(shared, alone)
    assert sorted(key[0] for key in plans) == ["decode", "decode", "select"]  # one per shape, reused after


def test_fp8_summaries_select_by_an_upper_bound_of_the_exact_quest_score():
    """fp8 kmin is rounded down and kmax up, so each block's fp8 Quest score bounds the exact one from above;
    the summaries are a quarter of fp32's bytes."""
    q, k, _, table = make_paged([700, 300])
    exact = ops.empty_reprs(k.shape[0], 2, 32, torch.float32, GSAConfig(), "cpu")
    fp8 = ops.empty_reprs(k.shape[0], 2, 32, torch.float32, GSAConfig(repr_dtype="fp8"), "cpu")
    full = torch.tensor([i for b, n in enumerate([700, 300]) for i in table[b, :n // BLOCK].tolist()])
    for reprs in (exact, fp8):
        ops.update_reprs("torch", k, full, reprs)
    columns = table[:, :700 // BLOCK]
    bound = torch_block_scores(q, *fp8[:3], columns, "quest", fp8[3])
    truth = torch_block_scores(q, *exact, columns, "quest")
    live = torch.zeros_like(truth, dtype=torch.bool)
    live[0, :, :700 // BLOCK] = True
    live[1, :, :300 // BLOCK] = True
    assert (bound[live] >= truth[live] - 1e-4).all() and (bound[live] - truth[live]).abs().max() > 0
    assert sum(r.numel() * r.element_size() for r in fp8[:2]) * 4 == sum(r.numel() * r.element_size()
                                                                         for r in exact[:2])


@pytest.mark.parametrize("change, match", [
    (dict(q=torch.zeros(3, 8, 32)), "q: got shape"),
    (dict(k=torch.zeros(10, 8, 2, 32)), "key_cache: got shape"),
    (dict(v=torch.zeros(10, 16, 2, 32, dtype=torch.float64)), "value_cache"),
])
def test_bad_layer_inputs_name_the_argument(change, match):
    q, k, v, table = make_paged([100, 50])
    args = {**dict(q=q, k=k, v=v), **change}
    gsa = GSA(CONFIG, block_size=BLOCK)
    plan = gsa.plan(["a", "b"], [100, 50], table)
    with pytest.raises(ValueError, match=match):
        gsa.run(plan, 0, args["q"], args["k"], args["v"])


def test_bad_batch_and_settings_are_refused():
    _, _, _, table = make_paged([100])
    gsa = GSA(CONFIG, block_size=BLOCK)
    with pytest.raises(ValueError, match="seq_lens\\[0\\]: 1000 tokens"):
        gsa.plan(["a"], [1000], table)
    with pytest.raises(ValueError, match="repeats an id"):
        gsa.plan(["a", "a"], [10, 10], torch.cat([table, table]))
    with pytest.raises(ValueError, match="block_table"):
        gsa.plan(["a"], [100], table.long())
    with pytest.raises(ValueError, match="backend"):
        GSA(CONFIG, block_size=BLOCK, backend="cuda")
    with pytest.raises(ValueError, match="OffloadedGSA"):
        GSA(GSAConfig(offload=True), block_size=BLOCK)
    with pytest.raises(ValueError, match="repr_dtype.*'bf8'.*cache.*fp8"):
        GSAConfig(repr_dtype="bf8")


@pytest.mark.parametrize("repr_dtype", ["cache", "fp8"])
def test_block_repr_cache_recomputes_only_blocks_whose_keys_changed(repr_dtype):
    _, k, _, table = make_paged([320, 160])
    cache = BlockReprCache(k, GSAConfig(repr_dtype=repr_dtype))
    blocks = torch.cat([table[0, :20], table[1, :10]])
    reprs = cache.refresh("torch", k, blocks)
    expected = empty_block_repr(k, torch.float8_e4m3fn if repr_dtype == "fp8" else None)
    assert len(reprs) == len(expected)
    naive_update_block_repr(k, blocks, *expected)
    assert cache.recomputed == 30 and all(torch.equal(a[blocks.long()], b[blocks.long()])
                                          for a, b in zip(reprs, expected))
    cache.refresh("torch", k, blocks)
    assert cache.recomputed == 30  # nothing changed
    rewritten = table[1, 3].long()  # e.g. a connector loaded other content into this block
    k[rewritten] = torch.randn(BLOCK, 2, 32)
    reprs = cache.refresh("torch", k, blocks)
    naive_update_block_repr(k, rewritten[None], *expected)
    assert cache.recomputed == 31 and all(torch.equal(a[rewritten], b[rewritten]) for a, b in zip(reprs, expected))
