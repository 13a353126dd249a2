"""sparse_decode / dense_decode (Triton; the interpreter on CPU) against the plain-torch reference and torch SDPA.

Cache slots that no request may read (unused physical blocks, tokens past seq_len in a last block) hold NaN,
so a stray read shows up as NaN in the output.
"""

import pytest
import torch
import torch.nn.functional as F

from ucm_kernels.sparse_decode import dense_decode, plan_decode, sparse_decode
from ucm_kernels.sparse_decode.naive import full_block_lists, naive_dense_decode, naive_sparse_decode

from paged_kv import TOLERANCE, make_paged_kv, poisoned_like

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_loop_bounds_fix():
    """The kernel loops over runtime bounds; Triton 3.6's interpreter converts them with ``int()`` on 1-element
    arrays, which numpy >= 2.4 rejects. Applies upstream's fix (triton PR #9172, after 3.6) for this module only;
    drop it with triton > 3.6 (or move it to conftest.py if other kernels need it)."""
    import triton.runtime.interpreter as interpreter
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor)
        yield


def paged(seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, **kwargs):
    """:func:`make_paged_kv` on this module's device."""
    return make_paged_kv(seq_lens, num_q_heads, num_kv_heads, head_dim, dtype, device=DEVICE, **kwargs)


def random_block_lists(seq_lens: torch.Tensor, num_kv_heads: int, block_size: int, seed: int = 1,
                       counts: list[list[int]] | None = None):
    """Sorted random logical-block lists per (request, KV head), -1 padded; random lengths in [1, nb] by default."""
    gen = torch.Generator().manual_seed(seed)
    nbs = [-(-int(n) // block_size) for n in seq_lens]
    if counts is None:
        counts = [[int(torch.randint(1, nb + 1, (1,), generator=gen)) for _ in range(num_kv_heads)] for nb in nbs]
    width = max(max(row) for row in counts)
    sel_idx = torch.full((len(nbs), num_kv_heads, width), -1, dtype=torch.int32)
    for b, nb in enumerate(nbs):
        for h in range(num_kv_heads):
            chosen = torch.randperm(nb, generator=gen)[:counts[b][h]].sort().values
            sel_idx[b, h, :len(chosen)] = chosen.int()
    return sel_idx.to(DEVICE), torch.tensor(counts, dtype=torch.int32, device=DEVICE)


def sdpa_reference(q, key_cache, value_cache, block_table, seq_lens) -> torch.Tensor:
    """torch SDPA (fp32, enable_gqa) per request over its unpaged KV."""
    outs = []
    for b, n in enumerate(seq_lens.tolist()):
        nb = -(-n // key_cache.shape[1])
        blocks = block_table[b, :nb].long()
        keys = key_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()
        values = value_cache[blocks].flatten(0, 1)[:n].transpose(0, 1).float()
        out = F.scaled_dot_product_attention(q[b, :, None].float(), keys, values, enable_gqa=True)
        outs.append(out[:, 0])
    return torch.stack(outs)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 2), (4, 4)])
def test_sparse_matches_reference_on_ragged_batch(dtype, head_dim, num_q_heads, num_kv_heads):
    q, k, v, table, lens = paged([37, 300, 5], num_q_heads, num_kv_heads, head_dim, dtype)
    sel_idx, sel_count = random_block_lists(lens, num_kv_heads, block_size=16)
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count)
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 2), (4, 4)])
def test_full_lists_equal_dense_and_sdpa(dtype, num_q_heads, num_kv_heads):
    q, k, v, table, lens = paged([200, 17, 64], num_q_heads, num_kv_heads, 64, dtype)
    sel_idx, sel_count = full_block_lists(lens, num_kv_heads, block_size=16)
    sparse = sparse_decode(q, k, v, table, lens, sel_idx, sel_count)
    dense = dense_decode(q, k, v, table, lens)
    sdpa = sdpa_reference(q, k, v, table, lens)
    assert_close(sparse, sdpa, dtype)
    assert_close(dense, sdpa, dtype)
    assert_close(dense, naive_dense_decode(q, k, v, table, lens), dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 64])
def test_split_count_does_not_change_result(num_splits):
    q, k, v, table, lens = paged([700, 260, 33], 8, 2, 64, torch.float16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[44, 30], [17, 1], [3, 3]])
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count, scale=0.2, num_splits=num_splits)
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count, scale=0.2), torch.float16)
    dense = dense_decode(q, k, v, table, lens, scale=0.2, num_splits=num_splits)
    assert_close(dense, naive_dense_decode(q, k, v, table, lens, scale=0.2), torch.float16)


@pytest.mark.parametrize("chunk_blocks", [3, 5, 13])
def test_splits_that_end_inside_a_tile_give_the_same_result(chunk_blocks):
    """Splits of any number of list entries (bench/list_waves.py plans them so; plan_decode rounds to whole
    128-token tiles): each split's last tile is partly masked, the merge is unchanged."""
    import dataclasses

    q, k, v, table, lens = paged([700, 260, 33], 8, 2, 64, torch.float16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[44, 30], [17, 1], [3, 3]])
    base = plan_decode(q, k, sel_idx.shape[2], num_splits=2)
    splits = -(-sel_idx.shape[2] // chunk_blocks)
    plan = dataclasses.replace(base, num_splits=splits, chunk_blocks=chunk_blocks,
                               acc=torch.empty(3, 8, splits, 64, dtype=torch.float32, device=DEVICE),
                               stats=torch.empty(3, 8, splits, 2, dtype=torch.float32, device=DEVICE))
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count, scale=0.2, plan=plan)
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count, scale=0.2), torch.float16)


def active_splits(plan) -> torch.Tensor:
    """``[batch, num_q_heads]`` splits that attended a token in the last call under ``plan`` (each split program
    writes its stats, an empty one a zero sum)."""
    return (plan.stats[..., 1] > 0).sum(-1)


def test_short_lists_under_a_wide_plan_spread_over_the_splits():
    """A plan for lists of up to 512 blocks (8 splits of 64) serving lists of 40, 9 and 3 blocks (a short request
    in a vLLM engine's wide table): each list is cut as a plan for its own length cuts it (128-token splits here),
    so the 40-block list takes 5 splits, not 1, and the output is bit for bit the one under a plan for 40 blocks;
    dense rows likewise (a 900-token row over 8 splits)."""
    q, k, v, table, lens = paged([900, 300, 100], 8, 2, 64, torch.bfloat16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[40, 33], [9, 12], [3, 1]])
    wide = plan_decode(q, k, 512, num_splits=8)
    assert (wide.num_splits, wide.chunk_blocks) == (8, 64)
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count, plan=wide)
    used = active_splits(wide)
    assert used[0].tolist() == [5] * 8 and used[1].tolist() == [2] * 8 and used[2].tolist() == [1] * 8
    own = plan_decode(q, k, 40, num_splits=8)
    assert torch.equal(out, sparse_decode(q, k, v, table, lens, sel_idx, sel_count, plan=own))
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count), torch.bfloat16)
    dense_wide = plan_decode(q, k, 512, num_splits=8, dense=True)
    dense = dense_decode(q, k, v, table, lens, plan=dense_wide)
    assert active_splits(dense_wide)[:, 0].tolist() == [8, 3, 1]  # 57, 19 and 7 blocks in 8-block splits
    assert_close(dense, naive_dense_decode(q, k, v, table, lens), torch.bfloat16)


def test_one_combine_compile_merges_every_split_count():
    """Lists cut into 2 to 130 splits (as a decode's growing lists add splits; past 64 the combine loops over
    several tiles of splits): each merges to the reference, and the combine launches in the specialisation of the
    first (on a GPU, a compile per split count would stall decoding; the split count is a runtime loop bound, not a
    constexpr)."""
    import dataclasses

    from ucm_kernels.sparse_decode.triton import _COMBINE

    q, k, v, table, lens = paged([2200, 260, 33], 8, 2, 64, torch.float16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[130, 30], [17, 1], [3, 3]])
    expected = naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count, scale=0.2)
    base = plan_decode(q, k, sel_idx.shape[2], num_splits=2)
    seen = None
    for chunk_blocks in (65, 22, 9, 4, 2, 1):
        splits = -(-sel_idx.shape[2] // chunk_blocks)
        plan = dataclasses.replace(base, num_splits=splits, chunk_blocks=chunk_blocks,
                                   acc=torch.empty(3, 8, splits, 64, dtype=torch.float32, device=DEVICE),
                                   stats=torch.empty(3, 8, splits, 2, dtype=torch.float32, device=DEVICE))
        out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count, scale=0.2, plan=plan, out=poisoned_like(q))
        assert_close(out, expected, torch.float16)
        seen = set(_COMBINE.specialisations) if seen is None else seen
        assert _COMBINE.specialisations == seen, f"{splits} splits"


def test_sel_rows_read_each_requests_lists_from_its_row():
    """Lists kept in other rows of a larger buffer (e.g. reuse slots), shuffled: sel_rows points each request at
    its row and the result is bit for bit the one of the lists passed in order; bad sel_rows name themselves."""
    q, k, v, table, lens = paged([700, 260, 33], 8, 2, 64, torch.bfloat16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16)
    rows = torch.tensor([4, 0, 2], device=DEVICE)
    kept_idx = torch.full((5, *sel_idx.shape[1:]), 7, dtype=torch.int32, device=DEVICE)
    kept_count = torch.full((5, 2), 99, dtype=torch.int32, device=DEVICE)
    kept_idx[rows], kept_count[rows] = sel_idx, sel_count
    expected = sparse_decode(q, k, v, table, lens, sel_idx, sel_count)
    assert torch.equal(sparse_decode(q, k, v, table, lens, kept_idx, kept_count, sel_rows=rows), expected)
    with pytest.raises(ValueError, match="sel_rows has shape"):
        sparse_decode(q, k, v, table, lens, kept_idx, kept_count, sel_rows=rows.int())


@pytest.mark.parametrize("dtype", DTYPES)
def test_lists_of_one_block(dtype):
    q, k, v, table, lens = paged([5, 300, 129], 8, 2, 64, dtype)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[1, 1], [1, 1], [1, 1]])
    sel_idx[2, 1, 0] = 8  # the partial last block: one live token out of 16
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count)
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_stay_finite_and_match(dtype):
    q, k, v, table, lens = paged([300, 90], 8, 2, 128, dtype)
    q = q * 100
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16)
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count, num_splits=2)
    assert torch.isfinite(out).all()
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count), dtype)


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size):
    q, k, v, table, lens = paged([150, 33], 8, 2, 64, torch.bfloat16, block_size=block_size)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=block_size)
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count)
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count), torch.bfloat16)
    assert_close(dense_decode(q, k, v, table, lens), sdpa_reference(q, k, v, table, lens), torch.bfloat16)


def test_empty_list_gives_zeros():
    q, k, v, table, lens = paged([100, 40], 8, 2, 64, torch.float16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[0, 4], [2, 0]])
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
    assert torch.equal(out[1, 4:], torch.zeros_like(out[1, 4:]))
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count), torch.float16)


def test_writes_only_out_and_leaves_inputs_unchanged():
    q_storage, k, v, table, lens = paged([90, 50], 16, 2, 64, torch.bfloat16)
    q = q_storage[:, ::2]  # strided q: every other head of a wider tensor
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16)
    inputs = (q, k, v, table, lens, sel_idx, sel_count)
    before = [t.clone() for t in inputs]
    canvas = torch.full((2, 8, 2, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    out = canvas[:, :, 1]  # strided destination inside a NaN canvas
    result = sparse_decode(*inputs, out=out)
    assert result is out
    assert torch.isnan(canvas[:, :, 0]).all()
    assert_close(out, naive_sparse_decode(*inputs), torch.bfloat16)
    for old, new in zip(before, inputs):
        assert torch.equal(old.view(torch.int16) if old.is_floating_point() else old,
                           new.view(torch.int16) if new.is_floating_point() else new)


def test_one_plan_serves_every_layer_and_narrower_lists():
    """A plan made once (wider than the lists) gives the same bits as fresh calls, for several layers' caches."""
    q, k, v, table, lens = paged([300, 77, 150], 8, 2, 64, torch.bfloat16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16)
    plan = plan_decode(q, k, sel_idx.shape[2] + 5, num_splits=3)
    assert plan.num_splits > 1 and plan.acc is not None
    for layer in range(2):
        k_layer, v_layer = (k, v) if layer == 0 else (v, k)  # another layer: other data, same shapes
        out = sparse_decode(q, k_layer, v_layer, table, lens, sel_idx, sel_count, plan=plan)
        assert torch.equal(out, sparse_decode(q, k_layer, v_layer, table, lens, sel_idx, sel_count, num_splits=3))
        assert_close(out, naive_sparse_decode(q, k_layer, v_layer, table, lens, sel_idx, sel_count), torch.bfloat16)
    dense_plan = plan_decode(q, k, table.shape[1], dense=True)
    assert (dense_plan.tile_tokens, dense_plan.num_warps, dense_plan.num_stages) == (64, 4, 2)
    assert torch.equal(dense_decode(q, k, v, table, lens, plan=dense_plan), dense_decode(q, k, v, table, lens))


def long_lists_case(dtype: torch.dtype) -> tuple:
    """Inputs with lists long enough for 20 splits: ragged, one list empty, one entry -1 (ignored)."""
    q, k, v, table, lens = paged([2100, 260, 33], 8, 2, 64, dtype)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[132, 90], [17, 1], [3, 0]])
    sel_idx[0, 1, 5] = -1
    return q, k, v, table, lens, sel_idx, sel_count


def reference(case: tuple, dense: bool) -> torch.Tensor:
    q, k, v, table, lens, sel_idx, sel_count = case
    if dense:
        return naive_dense_decode(q, k, v, table, lens)
    return naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count)


def test_many_splits_merge_to_the_reference():
    """Lists cut into more than 16 splits (ragged, one empty, one entry -1), sparse and dense: the combine launch
    merges every split's partial, 16 at a time (a poisoned ``out`` shows any row it misses)."""
    q, k, v, table, lens, sel_idx, sel_count = case = long_lists_case(torch.bfloat16)
    for dense in (False, True):
        plan = plan_decode(q, k, table.shape[1] if dense else sel_idx.shape[2], num_splits=20, dense=dense)
        assert plan.num_splits > 16
        if dense:
            out = dense_decode(q, k, v, table, lens, out=poisoned_like(q), plan=plan)
        else:
            out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count, out=poisoned_like(q), plan=plan)
        assert_close(out, reference(case, dense), torch.bfloat16)


def test_single_split_plan_writes_out_without_scratch():
    q, k, v, table, lens = paged([90, 50], 8, 2, 64, torch.float16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16, counts=[[6, 0], [1, 4]])
    plan = plan_decode(q, k, sel_idx.shape[2], num_splits=1)
    assert plan.num_splits == 1 and plan.acc is None and plan.stats is None
    out = sparse_decode(q, k, v, table, lens, sel_idx, sel_count, out=poisoned_like(q), plan=plan)
    assert torch.equal(out[0, 4:], torch.zeros_like(out[0, 4:]))  # the empty list
    assert_close(out, naive_sparse_decode(q, k, v, table, lens, sel_idx, sel_count), torch.float16)


@pytest.mark.parametrize("change,message", [
    (lambda a: dict(q=a["q"][:1], block_table=a["block_table"][:1], seq_lens=a["seq_lens"][:1],
                    sel_idx=a["sel_idx"][:1], sel_count=a["sel_count"][:1]), "plan was made for"),
    (lambda a: dict(sel_idx=torch.cat([a["sel_idx"]] * 2, dim=2)), "lists of up to"),
    (lambda a: dict(num_splits=2), "num_splits=2 given with a plan"),
])
def test_plan_must_match_the_call(change, message):
    valid = _valid_inputs()
    plan = plan_decode(valid["q"], valid["key_cache"], valid["sel_idx"].shape[2])
    with pytest.raises(ValueError, match=message):
        sparse_decode(**{**valid, **change(valid)}, plan=plan)


@pytest.mark.parametrize("kwargs,message", [(dict(max_blocks=-1), "max_blocks=-1"),
                                            (dict(max_blocks=4, num_splits=0), "num_splits=0"),
                                            (dict(max_blocks=4, dense="yes"), "dense='yes'; expected True or False")])
def test_plan_decode_rejects_bad_arguments(kwargs, message):
    valid = _valid_inputs()
    with pytest.raises(ValueError, match=message):
        plan_decode(valid["q"], valid["key_cache"], **kwargs)


def test_inputs_ready_gives_the_same_result_bit_for_bit():
    """``inputs_ready`` only moves when a launch starts on its lists (on sm_90 with PDL: the first tile's rows asked
    of L2 before waiting for the kernel ahead; elsewhere nothing changes): three layers in a row, as a step's
    reusing layers launch them (lists kept in rows of a larger buffer; dense between), equal the calls without it,
    eagerly and (on a GPU) replayed from one CUDA graph."""
    layers = [paged([700, 260, 33], 8, 2, 64, torch.bfloat16, seed=seed) for seed in (1, 2, 3)]
    lists = [random_block_lists(lens, 2, block_size=16, seed=seed) for seed, (*_, lens) in enumerate(layers)]
    rows = torch.tensor([2, 0, 1], device=DEVICE)
    kept = [(idx[rows.argsort()], count[rows.argsort()]) for idx, count in lists]  # request i's lists at rows[i]
    plan = plan_decode(layers[0][0], layers[0][1], max(idx.shape[2] for idx, _ in lists))
    dense_plan = plan_decode(layers[0][0], layers[0][1], layers[0][3].shape[1], dense=True)
    outs = [torch.empty_like(layers[0][0]) for _ in range(6)]

    def step(ready: bool) -> list[torch.Tensor]:
        for layer, ((q, k, v, table, lens), (idx, count)) in enumerate(zip(layers, kept)):
            sparse_decode(q, k, v, table, lens, idx, count, plan=plan, sel_rows=rows, out=outs[2 * layer],
                          inputs_ready=ready)
            dense_decode(q, k, v, table, lens, plan=dense_plan, out=outs[2 * layer + 1], inputs_ready=ready)
        return [out.clone() for out in outs]

    expected = step(False)
    for layer, ((q, k, v, table, lens), (idx, count)) in enumerate(zip(layers, lists)):
        assert torch.equal(expected[2 * layer], sparse_decode(q, k, v, table, lens, idx, count, plan=plan))
    assert all(torch.equal(a, b) for a, b in zip(step(True), expected))
    if DEVICE == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(True)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(outs, expected))


def _valid_inputs() -> dict:
    q, k, v, table, lens = paged([40, 20], 8, 2, 64, torch.float16)
    sel_idx, sel_count = random_block_lists(lens, 2, block_size=16)
    return dict(q=q, key_cache=k, value_cache=v, block_table=table, seq_lens=lens, sel_idx=sel_idx,
                sel_count=sel_count)


def _halves(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).half()


BAD_INPUTS = {  # case: (replacement of some valid inputs, expected message)
    "q dtype": (lambda a: dict(q=a["q"].float()), "q has dtype"),
    "q rank": (lambda a: dict(q=a["q"][:, :, None]), "q has shape"),
    "head_dim": (lambda a: dict(q=_halves(2, 8, 96), key_cache=_halves(4, 16, 2, 96),
                                value_cache=_halves(4, 16, 2, 96)), "head_dim 96"),
    "key_cache dtype": (lambda a: dict(key_cache=a["key_cache"].bfloat16()), "key_cache has dtype"),
    "value_cache shape": (lambda a: dict(value_cache=a["value_cache"][:-1]), "value_cache has shape"),
    "block_size": (lambda a: dict(key_cache=_halves(6, 12, 2, 64), value_cache=_halves(6, 12, 2, 64)), "block_size 12"),
    "group": (lambda a: dict(q=a["q"][:, :7]), "multiple of num_kv_heads"),
    "block_table dtype": (lambda a: dict(block_table=a["block_table"].long()), "block_table has dtype"),
    "seq_lens shape": (lambda a: dict(seq_lens=a["seq_lens"][:1]), "seq_lens has shape"),
    "sel_idx dtype": (lambda a: dict(sel_idx=a["sel_idx"].long()), "sel_idx has dtype"),
    "sel_count shape": (lambda a: dict(sel_count=a["sel_count"][:, :1]), "sel_count has shape"),
    "out dtype": (lambda a: dict(out=a["q"].bfloat16()), "out has shape"),
    "num_splits": (lambda a: dict(num_splits=0), "num_splits=0"),
    "inputs_ready": (lambda a: dict(inputs_ready=1), "inputs_ready=1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs(case):
    valid = _valid_inputs()
    change, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        sparse_decode(**{**valid, **change(valid)})


def test_dense_rejects_bad_inputs():
    valid = _valid_inputs()
    with pytest.raises(ValueError, match="block_table has dtype"):
        dense_decode(valid["q"], valid["key_cache"], valid["value_cache"], valid["block_table"].long(),
                     valid["seq_lens"])
