"""bench/harness.py's results file: where a run happened is recorded with its figures."""
import json
import types

import pytest

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


def test_settings_changed_restores_the_module_whatever_happens_inside():
    """An A/B's other side plans inside ``settings_changed``; the settings before come back after a normal exit and
    after an exception, and a name the module lacks is refused before anything is set."""
    tuned = types.SimpleNamespace(TILE=16, ROWS=(2048,))
    with harness.settings_changed(tuned, TILE=64, ROWS=(4096, 8192)):
        assert (tuned.TILE, tuned.ROWS) == (64, (4096, 8192))
    assert (tuned.TILE, tuned.ROWS) == (16, (2048,))
    with pytest.raises(KeyError, match="inside"):
        with harness.settings_changed(tuned, TILE=32):
            raise KeyError("inside")
    assert tuned.TILE == 16
    with pytest.raises(AttributeError, match="TILES"):
        with harness.settings_changed(tuned, TILE=8, TILES=4):
            raise AssertionError("entered with a misspelt setting")
    assert tuned.TILE == 16 and not hasattr(tuned, "TILES")
