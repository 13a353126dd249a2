"""bench/bench_gsa_offload.py --smoke --long on the CPU: every schedule runs its modes in lock-step, each offload
mode's outputs equal on-device GSA's bit for bit, and prefetch brings back what the alternating schedule evicts."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_checks_every_offload_mode_against_on_device_gsa(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.bench_gsa_offload", "--smoke", "--long"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("gsa_offload-*.json")
    rows = json.loads(path.read_text())["rows"]
    offload = {(r["shape"].rsplit("_", 1)[1], r["impl"]): r for r in rows if "offload" in r["impl"]}
    assert set(offload) == {(schedule, f"gsa_offload_prefetch_{p}") for schedule in ("steady", "alternating", "long")
                            for p in ("off", "on")}
    assert all(r["vs_gsa_bitwise_equal"] and r["tokens_per_s"] > 0 and "run" in r["host_ms_per_step"]
               for r in offload.values())
    off, on = offload["alternating", "gsa_offload_prefetch_off"], offload["alternating", "gsa_offload_prefetch_on"]
    assert off["prefetched_per_step"] == 0 < on["prefetched_per_step"] and on["hit_rate"] > off["hit_rate"] + 0.3
    assert offload["long", "gsa_offload_prefetch_off"]["gpu_share_of_kv"] <= 0.1
