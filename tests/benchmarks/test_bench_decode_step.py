"""bench/bench_decode_step.py --smoke: a tiny model's decode steps through the benchmark's code on the CPU (the
Triton interpreter, set before triton is first imported): its checks (each dense variant against SDPA, GSA
listing every block against dense decode, logits and tokens) pass and every variant is timed in both schedules."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_checks_and_times_every_variant():
    script = "import json, bench.bench_decode_step as b; print('ROWS ' + json.dumps(b.main(['--smoke'])))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ROWS "))[5:])
    got = {(r["schedule"], r["impl"]) for r in rows}
    assert got == {(schedule, impl) for schedule in ("steady", "alternating")
                   for impl in ("ucm_dense", "gsa_every1", "gsa_every4", "gsa_every8", "gsa_fp8_every4",
                                "gsa_budget2048", "gsa_budget2048_every4", "gsa_budget2048_every8",
                                "gsa_rerank2_every4", "gsa_rerank2_every8")}
    assert all(r["tokens_per_s"] > 0 and r["rows_per_step"] == (2 if r["schedule"] == "steady" else 1) for r in rows)
