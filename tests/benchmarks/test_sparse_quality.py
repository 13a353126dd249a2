"""bench/sparse_quality.py runs end to end on tiny sizes and writes a non-trivial JSON and PNG."""
import json

from bench import sparse_quality


def test_harness_writes_rows_targets_and_plot(tmp_path):
    path = sparse_quality.main(["--contexts", "256", "--batch", "1", "--trials", "1", "--out", str(tmp_path)])
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    assert len(rows) == len(sparse_quality.SCENARIOS) * len(sparse_quality.RULES) * len(sparse_quality.RATIOS)
    for row in rows:
        assert 0.0 < row["mass_recall_p05"] <= row["mass_recall_mean"] <= 1.0 + 1e-6
        assert row["rel_error_mean"] >= 0.0 and row["samples"] == sparse_quality.NUM_Q_HEADS
        assert 0.0 < row["blocks_attended"] <= 1.0
        assert ("needle_hit_rate" in row) == (row["name"] == "needle")
    needle_rows = [r for r in rows if r["name"] == "needle"]
    assert all(r["needles"] == sparse_quality.NUM_KV_HEADS * sparse_quality.NEEDLES_PER_HEAD for r in needle_rows)
    assert set(doc["targets_met"]) == {f"{s}/gsa_{rule}" for s in ("needle", "structured")
                                       for rule in sparse_quality.RULES}
    png = path.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
