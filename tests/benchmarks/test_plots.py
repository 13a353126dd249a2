"""Benchmark plots render from the committed results (or a tiny run) into non-trivial PNGs; run_all's planning,
requirements and results table."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench import plots, run_all

REPO = Path(__file__).resolve().parents[2]
# CPU benchmarks whose plot can come from a tiny run when no results file is committed yet.
TINY_RUNS = {"hit_rate": ["bench.bench_hit_rate", "--quick"],
             "sparse_quality": ["bench.sparse_quality", "--contexts", "1024", "--batch", "1", "--trials", "1"],
             "store": ["bench.bench_store", "--blocks", "8", "--mib", "1", "--repeats", "1"]}


def committed(bench: str) -> list[dict]:
    return [d for d in plots.load_results(plots.RESULTS_DIR.glob("*.json")) if d["bench"] == bench]


def source_docs(bench: str, tmp_path: Path) -> list[dict]:
    """The committed results of ``bench``, else those of a tiny run into ``tmp_path``."""
    docs = committed(bench)
    if docs or bench not in TINY_RUNS:
        return docs
    done = subprocess.run([sys.executable, "-m", *TINY_RUNS[bench]], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    return plots.load_results(tmp_path.glob(f"{bench}-*.json"))


def distinct_colors(png: Path, min_pixels: int = 200) -> int:
    """Colors covering at least ``min_pixels`` pixels (anti-aliasing fringes do not count)."""
    counts = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    return sum(1 for n, _ in counts if n >= min_pixels)


@pytest.mark.parametrize("bench", sorted(plots.PLOTTERS))
def test_every_plot_renders_non_trivially(bench, tmp_path):
    docs = source_docs(bench, tmp_path)
    assert docs, f"no results for {bench} in {plots.RESULTS_DIR}"
    written = plots.render(docs, tmp_path / "plots")
    assert written == [tmp_path / "plots" / plots.PLOTTERS[bench][0]]
    assert written[0].stat().st_size > 10_000
    assert distinct_colors(written[0]) >= 5  # background, text, grid, ours, the baseline / ceiling at least


def test_render_picks_the_newest_file_per_benchmark(tmp_path):
    doc = committed("e2e_ttft")[0]
    old = {**doc, "date": "2000-01-01", "rows": doc["rows"][:1]}
    new = {**doc, "date": "2999-01-01"}
    seen = []
    original = plots.PLOTTERS["e2e_ttft"]
    plots.PLOTTERS["e2e_ttft"] = (original[0], lambda d, path: seen.append(d["date"]) or path)
    try:
        plots.render([new, old], tmp_path)
    finally:
        plots.PLOTTERS["e2e_ttft"] = original
    assert seen == ["2999-01-01"]


def test_plots_command_renders_a_results_directory(tmp_path):
    for name in ("kv_transfer", "e2e_ttft"):
        (tmp_path / f"{name}.json").write_text(json.dumps(committed(name)[0]))
    (tmp_path / "unplotted.json").write_text(json.dumps({**committed("e2e_ttft")[0], "bench": "hashing"}))
    assert plots.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["transfer.png", "ttft.png"]


def test_plan_quick_full_all_and_no_repeats():
    assert [s.module for s in run_all.plan(["store"], quick=True)] == ["bench.bench_store", "bench.bench_hashing"]
    assert [s.module for s in run_all.plan(["store"], quick=False)][-1] == "bench.bench_remote_tiers"
    assert [s.module for s in run_all.plan(["hit-rate", "hit-rate"], quick=True)] == ["bench.bench_hit_rate"]
    everything = run_all.plan(["all"], quick=False)
    assert len(everything) == sum(len(steps) for steps in run_all.BENCHES.values())
    for step in everything:  # every script named exists in the checkout
        assert (REPO / (step.module.replace(".", "/") + ".py")).is_file()


def test_missing_requirements_are_named(monkeypatch):
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "needs a CUDA GPU" in run_all.missing_requirement(run_all.Step("x", needs="cuda"))
    assert "needs vLLM" in run_all.missing_requirement(run_all.Step("x", needs="vllm"))
    assert run_all.missing_requirement(run_all.Step("x")) is None


def test_results_table_shows_ours_beside_baseline_and_ceiling():
    doc = committed("kv_transfer")[0]
    table = run_all.results_table(doc).splitlines()
    assert table[0].startswith("== kv_transfer on NVIDIA H100 80GB HBM3 (") and '"h2d_pinned_gbps": ' in table[0]
    assert len(table) == 2 + len(doc["rows"])
    staged = next(line for line in table if line.startswith("offload_gpu_to_pinned") and "ucm_staged" in line
                  and "1024 blocks" in line)
    row = next(r for r in doc["rows"] if r["name"] == "offload_gpu_to_pinned" and r["impl"] == "ucm_staged"
               and r.get("blocks") == 1024)
    expected = [f"{row['median_ms']:.4g}", f"{row['gbps']:.4g}", f"{row['pct_of_ceiling']:.4g}",
                f"{row['speedup_vs_baseline']:.4g}"]  # the table's 4 significant digits
    assert staged.split()[-5:-1] == expected and staged.endswith("blocks=1024")
    quality = {"bench": "q", "gpu": "cpu", "date": "d", "ceilings": {},
               "rows": [{"name": "needle", "impl": "gsa_quest", "shape": "ctx1024_b1", "sparse_ratio": 0.3}]}
    assert run_all.results_table(quality).splitlines()[-1].split()[3:] == ["-", "-", "-", "-", "sparse_ratio=0.3"]
