"""Tensor-parallel ranks (processes) sharing one store: each rank's shard round-trips bit-exact, ids disjoint."""
import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_ranks_share_one_store_without_touching_each_others_shards(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    done = subprocess.run([sys.executable, "-m", "bench.bench_tp_ranks", "--ranks", "2", "--blocks", "32",
                           "--layers", "2", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bit-exact: True; ids disjoint across ranks: True" in done.stdout
    result = json.loads(next((tmp_path / "out").glob("tp_ranks-*.json")).read_text())
    assert {r["impl"] for r in result["rows"]} == {"ucm_1_rank", "ucm_2_ranks"}
    assert all(r["bit_exact"] and r["ids_disjoint"] for r in result["rows"])
