"""bench/bench_gsa_offload.py --smoke --long on the CPU: every schedule runs its modes in lock-step, each offload
mode's outputs equal on-device GSA's bit for bit, and prefetch brings back what the alternating schedule evicts."""
import collections
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import torch

from bench.bench_gsa_offload import _time_parts
from ucm_sparse import GSAConfig
from ucm_sparse.offload import OffloadedGSA
from ucm_store.backends.cache import CacheTier
from ucm_store.pool import PinnedMemoryPool

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


def test_smoke_run_with_selection_reuse_stays_bit_equal(tmp_path):
    """--select-every 4: on-device GSA and every offload mode reuse their lists alike, outputs bit-equal."""
    done = subprocess.run([sys.executable, "-m", "bench.bench_gsa_offload", "--smoke", "--select-every", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("gsa_offload-*.json")
    offload = [r for r in json.loads(path.read_text())["rows"] if "offload" in r["impl"]]
    assert len(offload) == 4 and all(r["vs_gsa_bitwise_equal"] and r["select_every"] == 4 for r in offload)


def test_timing_wrappers_leave_no_reference_cycle():
    """The host-time wrappers must not keep an OffloadedGSA (and its device pools) alive past its last reference:
    the bench's schedules need the memory back at once (an 80 GB card holds one schedule's pools at a time)."""
    gc.disable()
    try:
        gsa = OffloadedGSA(GSAConfig(sparse_ratio=0.5, offload=True, gpu_budget_blocks=64), num_layers=2,
                           num_kv_heads=2, head_dim=32, block_size=16, host_blocks=32, dtype=torch.float32,
                           device="cpu", cache=CacheTier(2, PinnedMemoryPool(1 << 20, 16 << 20, pinned=False)))
        spent = collections.Counter()
        _time_parts(gsa, spent)
        for layer in range(2):
            gsa.write_prompt("r", layer, torch.randn(40, 2, 32), torch.randn(40, 2, 32))
        plan = gsa.plan(["r"])
        out = gsa.run(plan, 0, torch.randn(1, 4, 32), torch.randn(1, 2, 32), torch.randn(1, 2, 32))
        assert out.shape == (1, 4, 32) and spent["plan"] > 0 and spent["run"] > 0 and spent["pool.admit_selection"] > 0
        pool = weakref.ref(gsa.pools[0])
        del gsa, plan
        assert pool() is None
    finally:
        gc.enable()
