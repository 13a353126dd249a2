"""The ``ucm`` command line as a new user meets it: config check, bench (small run: tables, JSON, plots), stats."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import ucm
from ucm.cli import main
from ucm_store.factory import UcmConnectorFactory
from ucm_store.metrics import StatsMonitor, start_metrics_server

REPO = Path(__file__).resolve().parents[1]
SEED_8_2 = """
ucm_connectors:
  - ucm_connector_name: "UcmPipelineStore"
    ucm_connector_config:
      store_pipeline: "Cache|Posix"
      storage_backends: "/data/ucm_cache"
      buffer_number: 2048
      cache_capacity: 50000
      block_size: 16
      use_direct_io: true

ucm_sparse_method: "GSA"
ucm_sparse_config:
  GSA:
    sparse_ratio: 0.3
    prefetch_workers: 4
"""


def ucm_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``ucm ARGS`` in a fresh process, from a directory outside the checkout (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "ucm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd="/")


def test_config_check_prints_the_resolved_config_with_defaults(tmp_path):
    path = tmp_path / "ucm.yaml"
    path.write_text(SEED_8_2)
    done = ucm_cli("config", "check", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# {path}: valid; resolved with defaults:\n")
    resolved = yaml.safe_load(done.stdout)
    store = resolved["ucm_connectors"][0]["ucm_connector_config"]
    assert (store["buffer_number"], store["cache_capacity"], store["use_direct_io"]) == (2048, 50000, True)
    assert store["storage_backends"] == ["/data/ucm_cache"]  # defaults filled in
    assert store["io_workers"] == min(8, os.cpu_count())  # resolved for this machine
    gsa = resolved["ucm_sparse_config"]["GSA"]
    assert (gsa["sparse_ratio"], gsa["prefetch_workers"], gsa["local_window_sz"]) == (0.3, 4, 4)


def test_the_readme_config_example_checks(capsys):
    assert main(["config", "check", str(REPO / "examples" / "ucm.yaml")]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    store = resolved["ucm_connectors"][0]["ucm_connector_config"]
    assert store["max_pinned_size"] >= store["cache_capacity"] * (2 << 20)  # the DRAM tier fits in the pool


def test_config_check_names_the_bad_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("store_pipeline: 'Cache|Posix'\nbuffer_numbr: 1024\n")
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'buffer_numbr' in the connector config: did you mean 'buffer_number'?" in err


def test_bench_quick_run_prints_tables_and_writes_json_and_plots(tmp_path):
    out = tmp_path / "results"
    done = ucm_cli("bench", "--quick", "hit-rate", "--out", str(out), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1/1] bench.bench_hit_rate ...\n[1/1] bench.bench_hit_rate: done in" in done.stderr  # progress
    assert "== hit_rate on cpu-" in done.stdout and "prefix_hit_rate           ucm_cache_posix" in done.stdout
    assert "hit_rate=" in done.stdout and "dram_hit_share=" in done.stdout
    hit = json.loads(next(out.glob("hit_rate-*.json")).read_text())
    assert {r["impl"] for r in hit["rows"]} == {"ucm_cache", "ucm_cache_posix"}
    assert all(r["mismatches"] == 0 for r in hit["rows"])
    assert max(r["hit_rate"] for r in hit["rows"]) == hit["ceilings"]["ideal_hit_rate"] > 0.5
    png = out / "plots" / "hit_rate.png"
    assert png.stat().st_size > 10_000 and f"plot: {png}" in done.stdout
    assert (out / "logs" / "bench_hit_rate.log").read_text().startswith("workload: 4 sessions x 3 turns")


def test_bench_skips_what_this_machine_cannot_run_and_says_why(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for the benchmark process, on any machine
    assert main(["bench", "transfer", "--quick", "--out", str(tmp_path)]) == 2  # nothing ran
    captured = capfd.readouterr()
    assert "bench.bench_kv_transfer: skipped: needs a CUDA GPU" in captured.err
    assert "results: none written" in captured.out and not list(tmp_path.glob("*.json"))


def test_bench_rejects_unknown_names(capfd):
    assert main(["bench", "latency"]) == 2
    assert "invalid choice: 'latency'" in capfd.readouterr().err


def test_bench_from_an_installation_without_the_checkout_fails_clearly(tmp_path, monkeypatch, capsys):
    installed = tmp_path / "site-packages" / "ucm" / "__init__.py"
    monkeypatch.setattr(ucm, "__file__", str(installed))
    assert main(["bench", "hit-rate"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'site-packages' / 'bench'} has none" in err and "clone the UCM repository" in err


def test_stats_reads_a_running_endpoint(tmp_path, capsys):
    monitor = StatsMonitor()
    monitor.record_lookup(400, 300, tier_hits={"Cache": 200, "Posix": 100})
    config = {"store_pipeline": "Cache|Posix", "storage_backends": str(tmp_path), "cache_capacity": 128}
    with UcmConnectorFactory.create_connector(config, 0) as store:
        ids = [b"a", b"b", b"c"]
        assert store.wait(store.dump(ids, 0, torch.randint(0, 256, (3, 4096), dtype=torch.uint8))) == 0
        store.commit(ids, [True] * 3)
        store.flush()
        server = start_metrics_server(0, monitor=monitor, stores=[store], health_interval=None)
        try:
            assert main(["stats", "--url", server.url]) == 0
        finally:
            server.close()
    out = capsys.readouterr().out
    assert out.startswith(f"UCM stats from {server.url}\n")
    assert "hit rate          75.0 %    300 of 400 blocks looked up; hits by tier: Cache 200, Posix 100" in out
    assert "load speed        0.00 GB/s  0 B in 0 blocks, 0 failed transfers" in out
    assert "save speed        0.00 GB/s  0 B in 0 blocks" in out  # the store fed the process's monitor, not this one
    assert "Cache             3 blocks    128 blocks      2.3 %" in out
    assert re.search(r"\nPosix +1\d\.\d KiB +unbounded +-\n", out)  # 3 x 4 KiB payload + a header per block
    assert "pinned pool" in out and "WARNING" not in out


def test_stats_without_an_endpoint_says_how_to_start_one(capsys):
    assert main(["stats", "--url", "http://127.0.0.1:9/metrics", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert "cannot read http://127.0.0.1:9/metrics" in err and "start_metrics_server(port)" in err
