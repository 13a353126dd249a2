"""bench/harness.py's results file: where a run happened is recorded with its figures."""
import json

from bench import harness


def test_results_file_names_the_host_cpu_and_its_kernel_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(harness, "cpu_flags", lambda: frozenset({"avx2", "amx_tile", "sse2"}))
    path = harness.write_results("unit", [harness.row("step", "ucm", "b1", 2.0, baseline_ms=3.0)], ceilings={})
    doc = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("unit-")
    assert doc["host"]["cpu_flags"] == ["amx_tile", "avx2"]  # only the flags of note, in their fixed order
    assert doc["host"]["cores"] >= 1 and doc["host"]["cpu_model"]
    assert doc["rows"] == [{"name": "step", "impl": "ucm", "shape": "b1", "median_ms": 2.0, "speedup_vs_baseline": 1.5}]


def test_results_file_is_named_by_its_commit(tmp_path, monkeypatch):
    """``<bench>-<gpu>-<date>-<7 hex digits>.json``: runs of two trees on one day keep two files; an unknown
    commit names none."""
    monkeypatch.setenv("OUT", str(tmp_path))
    names = []
    for commit in ("27fbfa8c0ffee", "3B27D37", "unknown"):
        monkeypatch.setenv("UCM_COMMIT", commit)
        path = harness.write_results("unit", [], ceilings={})
        assert json.loads(path.read_text())["commit"] == commit
        names.append(path.name)
    assert names[0].endswith("-27fbfa8.json") and names[1].endswith("-3B27D37.json")
    assert names[2].endswith(f"{harness.datetime.date.today().isoformat()}.json")
    assert len(set(names)) == 3
