"""bench/select_anatomy.py --smoke: the top-k anatomy's code on the CPU (Triton interpreter): every (table, scores,
setting, chunk) variant gives the first chunk's lists and a row."""
from bench_smoke import smoke_rows


def test_smoke_run_checks_every_variant():
    rows = smoke_rows("select_anatomy")
    assert {(r["blocks"], r["scores"], r["setting"], r["chunk"]) for r in rows} == {
        (blocks, scores, setting, chunk) for blocks in (40, 60) for scores in ("equal", "normal")
        for setting in ("ratio0.3", "budget2048") for chunk in (4, 16)}
    assert all(r["replay_us"] > 0 for r in rows)
