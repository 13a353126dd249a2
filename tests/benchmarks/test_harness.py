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
