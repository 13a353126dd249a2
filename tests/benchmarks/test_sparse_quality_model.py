"""bench/sparse_quality_model.py on the real SmolLM2-135M (CPU): its quick run writes every field, the dense
control (sparse_ratio 1.0 through the GSA hook) equals dense exactly, a small ratio measurably differs; texts
whose file is missing or whose token ids changed are refused."""
import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="the model extra (gguf) converts the model: pip install -e '.[model]'")

from bench import sparse_quality_model as sqm  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROW_KEYS = {"context", "rule", "block_size", "sparse_ratio", "token_budget", "dense_first_layers", "blocks_attended",
            "kv_attended", "ppl_dense", "ppl_gsa", "ppl_ratio", "kl_mean", "kl_p95", "top1_agreement", "flips",
            "flips_near_tie", "greedy_identical", "greedy_leading", "positions", "windows", "selected_share"}


@pytest.fixture(scope="module")
def doc(model_dir, tmp_path_factory):  # noqa: F811
    path = sqm.main(["--quick", "--model-dir", str(model_dir), "--out", str(tmp_path_factory.mktemp("sqm"))])
    assert path.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    return json.loads(path.read_text())


def _row(doc: dict, ratio: float) -> dict:
    return next(r for r in doc["rows"] if r["sparse_ratio"] == ratio)


def test_quick_run_records_every_field(doc):
    assert doc["bench"] == "sparse_quality_model" and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert ROW_KEYS <= row.keys()
        assert row["positions"] == 16 and row["windows"] == 1 and len(row["greedy_leading"]) == 1
    assert doc["texts"][0]["ids_sha256"] == sqm.TEXTS[0].sha256 and "prefill_seconds" in doc["texts"][0]
    assert doc["setup"]["dtype"] == "torch.float32" and "selection_reuse" in doc["setup"]


def test_quick_rows_select_at_every_step_and_count_nothing(doc):
    assert all(row["selected_share"] is None for row in doc["rows"])  # select_every 1: no reuse to count


def test_selected_share_counts_the_layer_steps_that_selected():
    assert sqm.selected_share([]) is None and sqm.selected_share([(0, 0)]) is None
    assert sqm.selected_share([(3, 5), (1, 7)]) == 0.25


def test_the_drift_sweep_reuses_with_and_without_the_drift_rule():
    settings = sqm.drift_sweep([2048, 8192]).settings[8192]
    drifts = [(s.select_every, s.config().select_drift) for s in settings]
    assert drifts == [(8, None), (8, 0.25), (8, 0.35), (16, None), (16, 0.3), (32, 0.3)]


def test_ratio_one_is_dense_exactly(doc):
    row = _row(doc, 1.0)
    assert row["blocks_attended"] == 1.0
    assert row["ppl_ratio"] == 1.0 and abs(row["kl_mean"]) < 1e-6
    assert row["top1_agreement"] == 1.0 and row["flips"] == 0
    assert row["greedy_identical"] == 1 and row["greedy_leading"] == [8]


def test_small_ratio_differs_measurably(doc):
    row = _row(doc, 0.1)
    assert row["blocks_attended"] < 0.5
    assert row["kl_mean"] > 1e-3 and row["ppl_ratio"] != 1.0


def test_changed_text_is_refused(model_dir):  # noqa: F811
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    changed = dataclasses.replace(sqm.TEXTS[0], sha256="0" * 64)
    with pytest.raises(sqm.TextError, match="licenses.*hash"):
        sqm.load_text(changed, tokenizer, 1)
    missing = dataclasses.replace(sqm.TEXTS[0], sources=(sqm.Source("numba", "NO_SUCH_FILE", 0, 10),))
    with pytest.raises(sqm.TextError, match="numba has no installed file ending in NO_SUCH_FILE"):
        sqm.load_text(missing, tokenizer, 1)


def test_oracle_keeps_the_windows_and_the_blocks_of_most_mass():
    from ucm_sparse import GSAConfig
    from ucm_sparse.hf import HFGSASettings

    settings = HFGSASettings(GSAConfig(sparse_ratio=0.5, init_window_sz=1, local_window_sz=1, min_blocks=1), 4)
    mass = torch.tensor([[0.0] * 4 + [5.0] * 4 + [1.0] * 4 + [9.0] * 4 + [2.0] * 4 + [0.0] * 2,  # 6 blocks of 4
                         [3.0] * 4 + [0.0] * 4 + [8.0] * 4 + [1.0] * 4 + [7.0] * 4 + [0.0] * 2])
    keep = sqm.oracle_blocks(mass, settings)  # 3 blocks each: block 0 (sink), block 5 (local), the best other one
    assert keep.shape == (2, 22)
    assert keep[0].view(-1)[::4].tolist() == [True, False, False, True, False, True]
    assert keep[1].view(-1)[::4].tolist() == [True, False, True, False, False, True]
    assert keep[:, 20:].all() and keep.sum(1).tolist() == [10, 10]  # whole blocks; the last holds 2 tokens


def test_rerank_spans_quest_and_the_oracle():
    """The two-stage selection with candidates = Quest's own count keeps Quest's blocks (the output of GSA's
    decode); with every block a candidate it is the oracle; in between it keeps only candidates."""
    from types import SimpleNamespace

    import ucm_sparse.hf as ucm_hf
    from ucm_sparse import GSAConfig

    gen = torch.Generator().manual_seed(0)
    settings = ucm_hf.HFGSASettings(GSAConfig(sparse_ratio=0.3, min_blocks=2), 16, "torch")
    key, value = torch.randn(2, 1, 2, 400, 32, generator=gen)
    query = torch.randn(1, 8, 1, 32, generator=gen)

    def rerank(candidates):
        module = SimpleNamespace(ucm_gsa=settings, ucm_candidates=candidates, layer_idx=3)
        return sqm.rerank_attention(module, query, key, value, None, scaling=0.2)[0]

    module = SimpleNamespace(ucm_gsa=settings, layer_idx=3, ucm_shared_list=False)
    torch.testing.assert_close(rerank(1.0), ucm_hf.gsa_attention(module, query, key, value, None, scaling=0.2)[0],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rerank(10.0), sqm.oracle_attention(module, query, key, value, None, scaling=0.2)[0])
    assert not torch.allclose(rerank(2.0), rerank(1.0)) and not torch.allclose(rerank(2.0), rerank(10.0))


def test_library_two_stage_selection_is_the_harness_rerank():
    """GSAConfig(rerank_candidates=C) through the transformers hook gives the output of the harness's rerank at C
    (the rule the harness priced is the one the library runs)."""
    from types import SimpleNamespace

    import ucm_sparse.hf as ucm_hf
    from ucm_sparse import GSAConfig

    gen = torch.Generator().manual_seed(1)
    key, value = torch.randn(2, 1, 2, 400, 32, generator=gen)
    query = torch.randn(1, 8, 1, 32, generator=gen)
    for candidates in (1.5, 3.0):
        config = GSAConfig(sparse_ratio=0.3, min_blocks=2, rerank_candidates=candidates)
        settings = ucm_hf.HFGSASettings(config, 16, "torch")
        library = SimpleNamespace(ucm_gsa=settings, layer_idx=3)
        harness = SimpleNamespace(ucm_gsa=ucm_hf.HFGSASettings(GSAConfig(sparse_ratio=0.3, min_blocks=2), 16,
                                                               "torch"), ucm_candidates=candidates, layer_idx=3)
        torch.testing.assert_close(ucm_hf.gsa_attention(library, query, key, value, None, scaling=0.2)[0],
                                   sqm.rerank_attention(harness, query, key, value, None, scaling=0.2)[0],
                                   atol=1e-5, rtol=1e-5)


def test_shared_suffix_on_a_rule_that_ranks_per_head_elsewhere_is_refused():
    with pytest.raises(ValueError, match="rule: 'rerank_shared'; '_shared' applies to 'oracle' and"):
        sqm.apply(None, sqm.Setting("rerank_shared", 32, 0.3, candidates=2.0))


def test_run_kinds_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        sqm.main(["--quick", "--oracle"])
    assert "--oracle: not allowed with argument --quick" in capsys.readouterr().err


def test_scored_quest_sum_is_the_library_quest_selection():
    """The score-rule path with ``quest_sum`` attends what GSA's decode attends (the rule the library runs), and
    the other rules choose differently on the same keys."""
    from types import SimpleNamespace

    import ucm_sparse.hf as ucm_hf
    from ucm_sparse import GSAConfig

    gen = torch.Generator().manual_seed(2)
    settings = ucm_hf.HFGSASettings(GSAConfig(sparse_ratio=0.3, min_blocks=2), 16, "torch")
    key, value = torch.randn(2, 1, 2, 397, 32, generator=gen)  # 25 blocks, the last one partial
    key = key * torch.rand(1, 1, 397, 1, generator=gen) * 3  # keys of unequal spread, so the rules differ
    query = torch.randn(1, 8, 1, 32, generator=gen)

    def scored(rule):
        module = SimpleNamespace(ucm_gsa=settings, ucm_score_rule=rule, layer_idx=3, ucm_shared_list=False)
        return sqm.scored_attention(module, query, key, value, None, scaling=0.2)[0]

    library = ucm_hf.gsa_attention(SimpleNamespace(ucm_gsa=settings, layer_idx=3), query, key, value, None,
                                   scaling=0.2)[0]
    torch.testing.assert_close(scored("quest_sum"), library, atol=1e-5, rtol=1e-5)
    outputs = [scored(rule) for rule in sqm.SCORE_RULES]
    assert sum(not torch.allclose(out, library) for out in outputs) >= 2


def test_shared_lists_keep_the_blocks_best_by_the_heads_summed_scores():
    """With one list per request every KV head keeps the windows and the blocks of highest summed score, where
    per-head lists follow each head's own scores."""
    import ucm_sparse.hf as ucm_hf
    from ucm_sparse import GSAConfig

    settings = ucm_hf.HFGSASettings(GSAConfig(sparse_ratio=0.5, init_window_sz=1, local_window_sz=1,
                                              min_blocks=1), 4)
    per_block = torch.tensor([[0.0, 9.0, 0.0, 5.0, 4.0, 0.0, 0.0, 0.0],  # 8 blocks of 4 tokens: 4 kept,
                              [0.0, 0.0, 3.0, 0.0, 4.0, 6.0, 0.0, 0.0]])  # 2 of them the windows (0 and 7)
    kept = {False: [[0, 1, 3, 7], [0, 4, 5, 7]], True: [[0, 1, 4, 7], [0, 1, 4, 7]]}
    for shared, blocks in kept.items():
        tokens = sqm.top_blocks(per_block, settings, 30, shared)  # the last block still filling (2 of 4 tokens)
        assert tokens.shape == (2, 30)
        assert [torch.nonzero(row[::4])[:, 0].tolist() for row in tokens] == blocks


@pytest.mark.parametrize("repr_dtype", ["cache", "fp8"])
def test_box_scores_read_the_summaries_the_library_keeps(repr_dtype):
    """quest_sum's box scores equal the library's Quest scores of the full blocks from the summaries it keeps
    (fp8 ones rounded outward and widened by their scale), and the block still filling scores 0."""
    import ucm_sparse.hf as ucm_hf
    from ucm_kernels.block_select.torch import block_scores
    from ucm_sparse import GSAConfig, ops

    gen = torch.Generator().manual_seed(4)
    settings = ucm_hf.HFGSASettings(GSAConfig(repr_dtype=repr_dtype), 16, "torch")
    key = torch.randn(2, 397, 32, generator=gen) * 3  # 24 full blocks and one still filling
    q = torch.randn(8, 32, generator=gen)
    blocks = ucm_hf.as_blocks(key[None], 16)
    reprs = ops.empty_reprs(25, 2, 32, key.dtype, settings.config, "cpu")
    ops.update_reprs("torch", blocks, torch.arange(24), reprs)
    kmin, kmax, kmean, *kscale = reprs
    library = block_scores(q[None], kmin, kmax, kmean, torch.arange(24)[None], "quest", *kscale, scale=0.2)[0]
    scores = sqm.box_scores(q, key, settings, 0.2, "quest_sum")
    torch.testing.assert_close(scores[:, :24], library * 0.2)
    assert (scores[:, 24] == 0).all()


def test_gauss_score_of_a_point_box_is_the_logit_and_softmax_rules_are_mass_shares():
    import ucm_sparse.hf as ucm_hf
    from ucm_sparse import GSAConfig

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 8, generator=gen)  # 2 KV heads x 3 query heads
    keys = torch.randn(2, 5, 1, 8, generator=gen).expand(2, 5, 4, 8).reshape(2, 20, 8)  # blocks of 4 equal keys
    logits = 0.3 * torch.einsum("hgd,hnd->hgn", q.view(2, 3, 8), keys[:, ::4])
    settings = ucm_hf.HFGSASettings(GSAConfig(), 4, "torch")
    torch.testing.assert_close(sqm.box_scores(q, keys, settings, 0.3, "gauss_sum"), logits.sum(1))
    torch.testing.assert_close(sqm.box_scores(q, keys, settings, 0.3, "gauss_softmax"),
                               torch.softmax(logits, -1).sum(1))
    spread = torch.randn(2, 22, 8, generator=gen)  # 5 full blocks and one still filling (score 0)
    for rule in ("quest_softmax", "gauss_softmax"):
        scores = sqm.box_scores(q, spread, settings, 0.3, rule)
        torch.testing.assert_close(scores.sum(-1), torch.full((2,), 3.0))
        assert scores.shape == (2, 6) and (scores[:, -1] == 0).all()
