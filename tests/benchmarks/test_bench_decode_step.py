"""bench/bench_decode_step.py --smoke: a tiny model's decode steps through the benchmark's code on the CPU (the
Triton interpreter, set before triton is first imported): its checks (each dense variant against SDPA, GSA
listing every block against dense decode, logits and tokens) pass and every variant is timed in both schedules."""
from bench_smoke import smoke_rows


def test_smoke_run_checks_and_times_every_variant():
    rows = smoke_rows("bench_decode_step")
    got = {(r["schedule"], r["impl"]) for r in rows}
    assert got == {(schedule, impl) for schedule in ("steady", "alternating")
                   for impl in ("ucm_dense", "gsa_every1", "gsa_every4", "gsa_every8", "gsa_fp8_every4",
                                "gsa_budget2048", "gsa_budget2048_every4", "gsa_budget2048_every8",
                                "gsa_rerank2_every4", "gsa_rerank2_every8")}
    assert all(r["tokens_per_s"] > 0 and r["rows_per_step"] == (2 if r["schedule"] == "steady" else 1) for r in rows)
