"""GSA over vLLM's FlashAttention cache layout (ucm_sparse.vllm.flash_step, the GPU backend's tensor code): the
decode rows' outputs against the torch reference over the same views, the summaries each step refreshes (filled
blocks, and every block of a prefilling row), mixed batches leaving other rows' outputs alone. Triton kernels in
the interpreter on CPU, compiled on a GPU."""
import pytest
import torch

from ucm_kernels.block_repr import naive_update_block_repr
from ucm_sparse import GSAConfig, ops
from ucm_sparse.vllm.flash_step import FlashGSA, LayerState, flash_kv_views, goes_sparse

from paged_kv import poisoned_like

BLOCK, HEADS, GROUP, HEAD = 16, 2, 4, 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = GSAConfig(sparse_ratio=0.3, init_window_sz=1, local_window_sz=2, min_blocks=3)


def flash_cache(num_blocks: int, seed: int = 0) -> torch.Tensor:
    """A FlashAttention cache as vLLM allocates it: logical [blocks, heads, block, 2 * head] over NHD memory."""
    gen = torch.Generator().manual_seed(seed)
    memory = torch.randn(num_blocks, BLOCK, HEADS, 2 * HEAD, generator=gen).to(torch.bfloat16).to(DEVICE)
    return memory.transpose(1, 2)


def batch(seq_lens, query_lens, num_blocks=64, seed=1):
    """Block table (distinct shuffled blocks), seq_lens, query_start_loc (device and host), queries."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // BLOCK) for n in seq_lens) + 1
    physical = torch.randperm(num_blocks, generator=gen)[:len(seq_lens) * width].view(len(seq_lens), width)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    queries = torch.randn(int(starts[-1]), HEADS * GROUP, HEAD, generator=gen).to(torch.bfloat16).to(DEVICE)
    return (physical.int().to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), starts.to(DEVICE),
            starts, queries)


def gsa(max_rows=4, select_every=1, select_drift=None) -> FlashGSA:
    config = GSAConfig(**{**vars(CONFIG), "select_every": select_every, "select_drift": select_drift})
    return FlashGSA(config, block_size=BLOCK, num_kv_heads=HEADS, num_q_heads=HEADS * GROUP, head_size=HEAD,
                    max_rows=max_rows, dtype=torch.bfloat16, device=DEVICE)


def summarised_layer(step: FlashGSA, kv_cache: torch.Tensor) -> LayerState:
    """``step``'s state for a layer of ``kv_cache``'s blocks, every block's summary computed."""
    layer = step.layer_state(kv_cache.shape[0])
    naive_update_block_repr(flash_kv_views(kv_cache, HEAD)[0], torch.arange(kv_cache.shape[0], device=DEVICE),
                            *layer.reprs)
    return layer


def captured(step, plan, q, kv_cache, layer, output) -> "torch.cuda.CUDAGraph":
    """One layer's run of ``plan`` captured as vLLM captures a decode batch, after a warm-up run (which compiles)
    on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step.run(plan, q, kv_cache, layer, HEAD ** -0.5, output)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.run(plan, q, kv_cache, layer, HEAD ** -0.5, output)
    return graph


def reference(q, kv_cache, table, seq_lens):
    """Torch GSA over the same views, every full block summarised from scratch."""
    key_cache, value_cache = flash_kv_views(kv_cache, HEAD)
    reprs = ops.empty_reprs(key_cache.shape[0], HEADS, HEAD, key_cache.dtype, CONFIG, DEVICE)
    full = torch.cat([table[r, :int(n) // BLOCK] for r, n in enumerate(seq_lens.tolist())])
    naive_update_block_repr(key_cache, full, *reprs)
    selection = ops.select("torch", q, reprs, table, seq_lens, CONFIG, BLOCK)
    return ops.attend("torch", q, key_cache, value_cache, table, seq_lens, selection, None), selection


def test_kv_views_read_keys_and_values_in_place():
    kv_cache = flash_cache(3)
    keys, values = flash_kv_views(kv_cache, HEAD)
    assert keys.shape == values.shape == (3, BLOCK, HEADS, HEAD)
    assert keys.data_ptr() == kv_cache.data_ptr() and values.data_ptr() == kv_cache.data_ptr() + 2 * HEAD
    assert torch.equal(keys[2, 5, 1], kv_cache[2, 1, 5, :HEAD])
    assert torch.equal(values[1, 0, 0], kv_cache[1, 0, 0, HEAD:])
    with pytest.raises(ValueError, match="2 \\* head_size = 64"):
        flash_kv_views(kv_cache, 32)


def test_uniform_decode_rows_equal_the_torch_reference():
    """A decode batch of a prefilling row (its earlier blocks came from elsewhere: all summarised), a steady row
    and a short row that stays dense: outputs and selections as the torch reference computes them."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([301, 208, 40], [1, 1, 1])
    step = gsa()
    layer = step.layer_state(64)
    reprs = layer.reprs
    for r in reprs:
        r.fill_(float("nan"))
    prefilling = torch.tensor([True, False, False])
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1, prefilling)
    assert plan.decode.uniform and plan.first.tolist() == [0, 12, 2] and plan.end.tolist() == [18, 13, 2]
    step.run(plan, q, kv_cache, layer, HEAD ** -0.5, output := poisoned_like(q))
    refreshed = torch.cat([table[0, :18], table[1, 12:13]]).long()
    assert not reprs[0][refreshed].isnan().any() and int(reprs[0].isnan().any(-1).any(-1).sum()) == 64 - 19
    expected, selection = reference(q, kv_cache, table, seq_lens)
    assert torch.equal(plan.decode.sel_count.cpu(), selection.sel_count.cpu())
    assert torch.equal(plan.decode.sel_idx[0].cpu(), selection.sel_idx[0].cpu())  # rows with every block summarised
    torch.testing.assert_close(output[[0, 2]], expected[[0, 2]], atol=2e-2, rtol=2e-2)
    assert int(selection.sel_count[0, 0]) < 19 and int(selection.sel_count[2, 0]) == 3  # sparse; dense


def test_short_requests_in_a_wide_table_select_and_attend_as_in_their_own(monkeypatch):
    """vLLM's block tables are max_model_len wide: requests of 100, 60 and 15 blocks in a 256-block table padded
    with a block of NaN, the radix top-k planned for it (rows cut to 64 and 16 keys: the requests search rows of
    256, 64 and 16 keys) and the attention planned for its width on a GPU of 132 SMs (each list cut into splits by
    its own length): lists and outputs as the torch reference computes them over the requests' own tables."""
    from ucm_kernels.block_select import radix
    from ucm_kernels.block_select import triton as block_select_triton
    from ucm_kernels.sparse_decode import triton as sparse_decode_triton

    monkeypatch.setattr(radix, "MIN_BLOCKS", 1)
    monkeypatch.setattr(radix, "MIN_SLICE", 16)
    monkeypatch.setattr(radix, "ROWS", (256,))
    monkeypatch.setattr(radix, "CUTS", {256: (4, 16)})
    monkeypatch.setattr(block_select_triton, "sm_count", lambda device: 132)
    monkeypatch.setattr(sparse_decode_triton, "sm_count", lambda device: 132)
    kv_cache = flash_cache(304)
    kv_cache[303] = float("nan")
    table, seq_lens, starts, starts_cpu, q = batch([1590, 950, 230], [1, 1, 1], num_blocks=303)
    wide = torch.full((3, 256), 303, dtype=torch.int32, device=DEVICE)
    wide[:, :table.shape[1]] = table
    step = gsa()
    layer = summarised_layer(step, kv_cache)
    plan = step.plan(seq_lens, starts, starts_cpu, wide, 1)
    assert plan.decode.select.radix_slice == 32 and plan.decode.decode.num_splits > 1
    step.run(plan, q, kv_cache, layer, HEAD ** -0.5, output := poisoned_like(q))
    expected, selection = reference(q, kv_cache, table, seq_lens)
    width = selection.sel_idx.shape[2]
    assert torch.equal(plan.decode.sel_count.cpu(), selection.sel_count.cpu())
    assert torch.equal(plan.decode.sel_idx[:3, :, :width].cpu(), selection.sel_idx.cpu())
    torch.testing.assert_close(output, expected, atol=2e-2, rtol=2e-2)


def test_gauss_rule_rows_equal_the_torch_reference_at_the_layers_scale():
    """score="gauss" (each query head scored at the layer's softmax scale, shares summed in the top-k program):
    the decode rows' lists and outputs as the torch twin computes them over the summaries the step refreshed."""
    config = GSAConfig(**{**vars(CONFIG), "score": "gauss"})
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([301, 208, 170], [1, 1, 1])
    step = FlashGSA(config, block_size=BLOCK, num_kv_heads=HEADS, num_q_heads=HEADS * GROUP, head_size=HEAD,
                    max_rows=4, dtype=torch.bfloat16, device=DEVICE)
    layer = step.layer_state(64)
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1, torch.tensor([True, True, True]))
    step.run(plan, q, kv_cache, layer, 0.5, output := poisoned_like(q))
    key_cache, value_cache = flash_kv_views(kv_cache, HEAD)
    selection = ops.select("torch", q, layer.reprs, table, seq_lens, config, BLOCK, scale=0.5)
    width = selection.sel_idx.shape[2]
    assert torch.equal(plan.decode.sel_count[:3].cpu(), selection.sel_count.cpu())
    assert torch.equal(plan.decode.sel_idx[:3, :, :width].cpu(), selection.sel_idx.cpu())
    expected = ops.attend("torch", q, key_cache, value_cache, table, seq_lens, selection, 0.5)
    torch.testing.assert_close(output, expected, atol=2e-2, rtol=2e-2)
    at_default = ops.select("torch", q, layer.reprs, table, seq_lens, config, BLOCK)  # scale 1/8: other lists
    assert not torch.equal(at_default.sel_idx, selection.sel_idx)


def test_decode_steps_refresh_only_the_block_they_fill():
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([160, 161, 175], [1, 1, 1])
    step = gsa()
    layer = step.layer_state(64)
    reprs = layer.reprs
    for r in reprs:
        r.fill_(100.0)  # no key is that large
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1)
    assert plan.first.tolist() == [9, 10, 10] and plan.end.tolist() == [10, 10, 10]  # only row 0 filled one
    step.run(plan, q, kv_cache, layer, HEAD ** -0.5, torch.empty_like(q))
    changed = (reprs[0] != 100.0).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == [int(table[0, 9])]


def test_mixed_batch_writes_only_the_decode_rows():
    """A prefill chunk (its blocks filled this step: summarised) between two decode rows; vLLM's kernel owns
    the prefill tokens' outputs, GSA writes the decode rows' and nothing else."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([250, 100, 230], [1, 37, 1])
    step = gsa()
    layer = step.layer_state(64)
    reprs = layer.reprs
    naive_update_block_repr(flash_kv_views(kv_cache, HEAD)[0], torch.cat([table[0, :15], table[2, :14]]), *reprs)
    plan = step.plan(seq_lens, starts, starts_cpu, table, 37)
    assert not plan.decode.uniform and plan.decode.tokens.tolist() == [0, 38]
    assert plan.first.tolist() == [15, 0, 14] and plan.end.tolist() == [15, 6, 14]
    output = torch.full_like(q, 7.0)
    step.run(plan, q, kv_cache, layer, HEAD ** -0.5, output)
    expected, _ = reference(q[[0, 38]], kv_cache, table[[0, 2]], seq_lens[[0, 2]])
    torch.testing.assert_close(output[[0, 38]], expected, atol=2e-2, rtol=2e-2)
    assert (output[1:38] == 7.0).all()
    key_cache = flash_kv_views(kv_cache, HEAD)[0]
    summary = ops.empty_reprs(64, HEADS, HEAD, torch.bfloat16, CONFIG, DEVICE)
    naive_update_block_repr(key_cache, table[1, :6], *summary)
    assert torch.equal(reprs[0][table[1, :6].long()], summary[0][table[1, :6].long()])


def test_a_batch_of_prefills_only_has_no_decode_rows_and_plans_reuse_buffers():
    table, seq_lens, starts, starts_cpu, _ = batch([64, 40], [64, 40])
    step = gsa()
    assert step.plan(seq_lens, starts, starts_cpu, table, 64).decode is None
    table, seq_lens, starts, starts_cpu, _ = batch([300, 90], [1, 1])
    first, second = (step.plan(seq_lens, starts, starts_cpu, table, 1) for _ in range(2))
    assert first.decode.select is second.decode.select and first.decode.sel_idx.data_ptr() == \
        second.decode.sel_idx.data_ptr() and first.first.data_ptr() == second.first.data_ptr()
    with pytest.raises(ValueError, match="max_rows=1"):
        gsa(max_rows=1).plan(seq_lens, starts, starts_cpu, table, 1)


@pytest.mark.parametrize("select_every", [1, 2])
def test_two_stage_rows_equal_the_torch_two_stage_selection(select_every):
    """rerank_candidates 2: the decode rows' lists and outputs as the torch backend's two stages compute them over
    the same views; with select_every 2 the next step (no block filled) keeps them while the queries change."""
    config = GSAConfig(**{**vars(CONFIG), "rerank_candidates": 2.0, "select_every": select_every})
    step = FlashGSA(config, block_size=BLOCK, num_kv_heads=HEADS, num_q_heads=HEADS * GROUP, head_size=HEAD,
                    max_rows=4, dtype=torch.bfloat16, device=DEVICE)
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([301, 250, 40], [1, 1, 1])
    layer = step.layer_state(64)
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1, torch.tensor([True, True, False]))
    step.run(plan, q, kv_cache, layer, HEAD ** -0.5, output := poisoned_like(q))
    key_cache, value_cache = flash_kv_views(kv_cache, HEAD)
    reprs = ops.empty_reprs(64, HEADS, HEAD, key_cache.dtype, config, DEVICE)
    naive_update_block_repr(key_cache, torch.cat([table[0, :18], table[1, :15], table[2, :2]]), *reprs)
    expected = ops.select("torch", q, reprs, table, seq_lens, config, BLOCK, key_cache=key_cache)
    one_stage = ops.select("torch", q, reprs, table, seq_lens, CONFIG, BLOCK)
    assert not torch.equal(expected.sel_idx, one_stage.sel_idx)  # the second stage changed some list
    used = lists_in_use(layer, plan.decode) if select_every > 1 else ops.Selection(plan.decode.sel_idx,
                                                                                    plan.decode.sel_count)
    assert torch.equal(used.sel_idx.cpu(), expected.sel_idx.cpu())
    attended = ops.attend("torch", q, key_cache, value_cache, table, seq_lens, expected, HEAD ** -0.5)
    torch.testing.assert_close(output.float(), attended.float(), atol=1e-2, rtol=1e-2)
    if select_every > 1:
        _, reselected, kept = reused_step(step, seq_lens + 1, starts, starts_cpu, table, -q, kv_cache, layer)
        assert reselected == [0, 0, 0] and torch.equal(kept.sel_idx.cpu(), expected.sel_idx.cpu())


def test_ratio_one_without_a_budget_never_goes_sparse():
    assert not goes_sparse(GSAConfig(sparse_ratio=1.0))
    assert goes_sparse(GSAConfig(sparse_ratio=1.0, token_budget=512)) and goes_sparse(CONFIG)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/run_gpu.sh tests runs this)")
def test_a_captured_uniform_decode_step_replays_with_the_next_steps_values():
    """Capture one layer's run under a CUDA graph as vLLM captures a decode batch, then write the next step's
    lengths, table and queries into the same buffers, re-plan (as vLLM's builder does) and replay: the output is
    the reference's for the new values."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([300, 207, 159], [1, 1, 1])
    step = gsa()
    layer = step.layer_state(64)
    reprs = layer.reprs
    naive_update_block_repr(flash_kv_views(kv_cache, HEAD)[0], table.flatten()[table.flatten() >= 0], *reprs)
    output = torch.zeros_like(q)
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1)
    graph = captured(step, plan, q, kv_cache, layer, output)
    seq_lens += torch.tensor([1, 1, 1], dtype=torch.int32, device=DEVICE)  # 301, 208 (fills block 12), 160
    table[0] = table[0].flip(0)  # another request's blocks in row 0
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(q))
    replanned = step.plan(seq_lens, starts, starts_cpu, table, 1, torch.tensor([True, False, False]))
    assert replanned.first.data_ptr() == plan.first.data_ptr() and replanned.decode.sel_idx.data_ptr() == \
        plan.decode.sel_idx.data_ptr()
    graph.replay()
    expected, _ = reference(q, kv_cache, table, seq_lens)
    torch.testing.assert_close(output, expected, atol=2e-2, rtol=2e-2)


def reused_step(step, seq_lens, starts, starts_cpu, table, q, kv_cache, layer, prefilling=None):
    """Plan and run one step; return (output, the rows that reselected, the lists the step attended)."""
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1, prefilling)
    step.run(plan, q, kv_cache, layer, HEAD ** -0.5, output := poisoned_like(q))
    return output, plan.decode.reselect.tolist(), lists_in_use(layer, plan.decode)


def lists_in_use(layer, rows) -> ops.Selection:
    """The lists each decode row attended: its slot's in the layer's store."""
    stored = layer.selections.buffers(rows.select.width)
    return ops.Selection(stored[0][rows.slots].clone(), stored[1][rows.slots].clone())


def test_select_every_reuses_each_rows_lists_until_a_block_fills_or_they_age():
    """select_every=4 over five decode steps with new queries each step: a row reselects at its first step, when
    its sequence fills a block (row 1 at 209 tokens, row 0 at 305) and after 4 steps (row 2); otherwise it attends
    exactly the lists it chose before. Every step's output is the torch reference over the lists in use."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, _ = batch([301, 206, 170], [1, 1, 1])
    step = gsa(select_every=4)
    layer = step.layer_state(64)
    gen = torch.Generator().manual_seed(9)
    in_use, stale_differs = None, False
    expected_reselect = [[1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]
    for i, wanted in enumerate(expected_reselect):
        q = torch.randn(3, HEADS * GROUP, HEAD, generator=gen).to(torch.bfloat16).to(DEVICE)
        output, reselect, lists = reused_step(step, seq_lens, starts, starts_cpu, table, q, kv_cache, layer,
                                              torch.tensor([i == 0] * 3))
        assert reselect == wanted, f"step {i}"
        _, fresh = reference(q, kv_cache, table, seq_lens)
        for row, again in enumerate(wanted):
            source = fresh if again else in_use
            assert torch.equal(lists.sel_idx[row].cpu(), source.sel_idx[row].cpu()), f"step {i} row {row}"
            assert torch.equal(lists.sel_count[row].cpu(), source.sel_count[row].cpu())
            stale_differs |= not again and not torch.equal(in_use.sel_idx[row].cpu(), fresh.sel_idx[row].cpu())
        key_cache, value_cache = flash_kv_views(kv_cache, HEAD)
        expected = ops.attend("torch", q, key_cache, value_cache, table, seq_lens, lists, None)
        torch.testing.assert_close(output, expected, atol=2e-2, rtol=2e-2)
        in_use = lists
        seq_lens += 1
    assert stale_differs  # the test tells reused lists from fresh ones


def test_a_row_holding_another_request_reselects():
    """The same lengths as a continuation but another request's blocks in row 0 (its last block differs), or a
    wider block table: those rows select afresh."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([301, 206], [1, 1])
    step = gsa(select_every=8)
    layer = summarised_layer(step, kv_cache)
    assert reused_step(step, seq_lens, starts, starts_cpu, table, q, kv_cache, layer)[1] == [1, 1]
    seq_lens += 1
    swapped = table.clone()
    swapped[0] = table[0].roll(1)
    assert reused_step(step, seq_lens, starts, starts_cpu, swapped, q, kv_cache, layer)[1] == [1, 0]
    seq_lens += 1
    wider = torch.cat([swapped, swapped[:, :1]], dim=1)
    assert reused_step(step, seq_lens, starts, starts_cpu, wider, q, kv_cache, layer)[1] == [1, 1]


def test_mixed_batches_keep_the_decode_rows_lists_in_their_batch_rows():
    """A decode row next to a prefill chunk reuses the lists its batch row selected at the previous (uniform) step,
    and the lists a mixed step selects serve the next uniform step."""
    kv_cache = flash_cache(64)
    step = gsa(select_every=4)
    layer = summarised_layer(step, kv_cache)
    table, seq_lens, starts, starts_cpu, q = batch([250, 100, 230], [1, 1, 1])
    _, reselect, first = reused_step(step, seq_lens, starts, starts_cpu, table, q, kv_cache, layer)
    assert reselect == [1, 1, 1]
    seq_lens += torch.tensor([1, 37, 1], dtype=torch.int32, device=DEVICE)
    _, _, _, mixed_starts_cpu, mixed_q = batch([251, 137, 231], [1, 37, 1])
    plan = step.plan(seq_lens, mixed_starts_cpu.to(DEVICE), mixed_starts_cpu, table, 37)
    assert plan.decode.reselect.tolist() == [0, 0] and plan.decode.slots.tolist() == [0, 2]
    step.run(plan, mixed_q, kv_cache, layer, HEAD ** -0.5, output := torch.zeros_like(mixed_q))
    kept = ops.Selection(first.sel_idx[[0, 2]], first.sel_count[[0, 2]])
    expected = ops.attend("torch", mixed_q[[0, 38]], *flash_kv_views(kv_cache, HEAD), table[[0, 2]],
                          seq_lens[[0, 2]], kept, None)
    torch.testing.assert_close(output[[0, 38]], expected, atol=2e-2, rtol=2e-2)
    seq_lens += 1
    _, reselect, lists = reused_step(step, seq_lens, starts, starts_cpu, table, q, kv_cache, layer)
    assert reselect == [0, 1, 0]  # row 1 was a prefill row last step: it forgot its request
    assert torch.equal(lists.sel_idx[[0, 2]].cpu(), first.sel_idx[[0, 2]].cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/run_gpu.sh tests runs this)")
def test_a_captured_step_with_select_every_replays_reusing_and_reselecting():
    """One layer's run with select_every=4 captured once, then replayed over four more steps (lengths and queries
    written into the captured buffers, the plan made eagerly before each replay as vLLM's builder does): each
    replay reselects the rows the plan says and reuses the others' lists, as the eager path does."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([301, 206, 170], [1, 1, 1])
    step = gsa(select_every=4)
    layer = summarised_layer(step, kv_cache)
    output = torch.zeros_like(q)
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1)
    graph = captured(step, plan, q, kv_cache, layer, output)
    gen = torch.Generator().manual_seed(3)
    for wanted in ([0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]):  # steps at 302/207/171 .. 305/210/174
        seq_lens += 1
        before = lists_in_use(layer, plan.decode).sel_idx
        q.copy_(torch.randn(q.shape, generator=gen).to(q))
        replanned = step.plan(seq_lens, starts, starts_cpu, table, 1)
        assert replanned.decode.reselect.data_ptr() == plan.decode.reselect.data_ptr()
        assert replanned.decode.slots.data_ptr() == plan.decode.slots.data_ptr()
        assert replanned.decode.reselect.tolist() == wanted
        graph.replay()
        _, fresh = reference(q, kv_cache, table, seq_lens)
        lists = lists_in_use(layer, replanned.decode)
        for row, again in enumerate(wanted):
            assert torch.equal(lists.sel_idx[row], (fresh.sel_idx if again else before)[row])
        expected = ops.attend("torch", q, *flash_kv_views(kv_cache, HEAD), table, seq_lens, lists, None)
        torch.testing.assert_close(output, expected, atol=2e-2, rtol=2e-2)


def test_batches_taking_turns_in_the_same_rows_keep_their_own_lists():
    """Two groups of two requests take turns in rows 0-1 (as pipeline-parallel micro-batches do), the second group
    with its rows swapped on its second turn: each request attends its own kept lists (found by its last block),
    not the other group's."""
    kv_cache = flash_cache(96)
    step = gsa(select_every=4)
    layer = summarised_layer(step, kv_cache)
    table, _, starts, starts_cpu, _ = batch([300, 200, 250, 150], [1, 1, 1, 1], num_blocks=96)
    groups = {"a": (table[:2], [300, 200]), "b": (table[2:], [250, 150])}
    gen = torch.Generator().manual_seed(2)
    first = {}
    for turn, name in enumerate(["a", "b", "a", "b"]):
        rows_table, lens = groups[name]
        order = [1, 0] if turn == 3 else [0, 1]
        lens_now = torch.tensor([lens[i] + turn // 2 for i in order], dtype=torch.int32, device=DEVICE)
        q = torch.randn(2, HEADS * GROUP, HEAD, generator=gen).to(torch.bfloat16).to(DEVICE)
        _, reselect, lists = reused_step(step, lens_now, starts[:3], starts_cpu[:3], rows_table[order], q, kv_cache,
                                         layer)
        if turn < 2:
            assert reselect == [1, 1]
            first[name] = lists.sel_idx.clone()
        else:
            assert reselect == [0, 0], name
            assert torch.equal(lists.sel_idx.cpu(), first[name][order].cpu())


def test_select_drift_reselects_the_rows_whose_queries_turned():
    """select_every 8 with select_drift 0.1: at steps the reuse rule keeps every row, a row whose queries turned
    selects afresh (the lists the torch reference selects for its new queries) and its queries become its slot's;
    rows whose queries moved a little keep their lists and the queries they were selected with."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([301, 206, 170], [1, 1, 1])
    step = gsa(select_every=8, select_drift=0.1)
    layer = summarised_layer(step, kv_cache)
    made = layer.selections.queries(q)  # the kept queries exist before any step (never made inside a capture)
    assert made.shape == (4 * 4 + 1, HEADS * GROUP, HEAD) and not made.any()
    assert reused_step(step, seq_lens, starts, starts_cpu, table, q, kv_cache, layer)[1] == [1, 1, 1]
    assert layer.selections.queries(q).data_ptr() == made.data_ptr()
    gen = torch.Generator().manual_seed(4)
    for turning in (1, 0):  # two steps inside the rows' last blocks: row 1 turns, then row 0
        noise = torch.randn(q.shape, generator=gen).to(q)
        q = (q + 0.02 * noise).to(q)
        q[turning] = noise[turning]
        seq_lens += 1
        plan = step.plan(seq_lens, starts, starts_cpu, table, 1)
        assert plan.decode.reselect.tolist() == [0, 0, 0]  # the reuse rule keeps every row
        before = lists_in_use(layer, plan.decode)
        kept = layer.selections.queries(q)[plan.decode.slots].clone()
        step.run(plan, q, kv_cache, layer, HEAD ** -0.5, poisoned_like(q))
        _, fresh = reference(q, kv_cache, table, seq_lens)
        lists, stored = lists_in_use(layer, plan.decode), layer.selections.queries(q)[plan.decode.slots]
        for row in range(3):
            wanted = (fresh if row == turning else before).sel_idx[row]
            assert torch.equal(lists.sel_idx[row].cpu(), wanted.cpu()), f"row {row} turning {turning}"
            assert torch.equal(stored[row].cpu(), (q if row == turning else kept)[row].cpu())
        assert not torch.equal(fresh.sel_idx[turning].cpu(), before.sel_idx[turning].cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/run_gpu.sh tests runs this)")
def test_a_captured_step_with_select_drift_reselects_only_the_turned_row():
    """One layer's run with select_every 8 and select_drift 0.1 captured once, then replayed over three steps inside
    the rows' last blocks with the queries barely moving but one row turning each step: each replay's layer mask
    names only the turned row (kept queries survive replays), whose lists are then the fresh ones."""
    kv_cache = flash_cache(64)
    table, seq_lens, starts, starts_cpu, q = batch([301, 200, 170], [1, 1, 1])  # 3 more tokens open no block
    step = gsa(select_every=8, select_drift=0.1)
    layer = summarised_layer(step, kv_cache)
    output = torch.zeros_like(q)
    plan = step.plan(seq_lens, starts, starts_cpu, table, 1)
    graph = captured(step, plan, q, kv_cache, layer, output)
    gen = torch.Generator().manual_seed(5)
    for turning in (1, 0, 2):
        seq_lens += 1
        noise = torch.randn(q.shape, generator=gen).to(q)
        moved = (q + 0.02 * noise).to(q)
        moved[turning] = noise[turning]
        q.copy_(moved)
        replanned = step.plan(seq_lens, starts, starts_cpu, table, 1)
        assert replanned.decode.reselect.tolist() == [0, 0, 0]
        before = lists_in_use(layer, replanned.decode).sel_idx
        graph.replay()
        assert step._layer_reselect[:3].tolist() == [int(row == turning) for row in range(3)]
        _, fresh = reference(q, kv_cache, table, seq_lens)
        lists = lists_in_use(layer, replanned.decode)
        for row in range(3):
            assert torch.equal(lists.sel_idx[row], (fresh.sel_idx if row == turning else before)[row])
