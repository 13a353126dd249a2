"""Shared benchmark harness: results rows, measured ceilings and the JSON format of docs/benchmarks.md.

A bench script builds rows with :func:`row`, measures the ceilings it compares against in the same run with
the ``measure_*`` helpers, and writes one file with :func:`write_results` (to ``$OUT`` on the lent GPU, else
``bench/results/``).
"""
import contextlib
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ucm_store.cpu_features import cpu_flags, cpu_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def settings_changed(module, **values):
    """Within: each ``name=value`` of ``values`` set on ``module`` (a module's tuning constant, as an A/B's other
    side plans with it); the values before are restored on leaving, whatever happens inside."""
    kept = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(module, name, value)


def git_commit() -> str:
    """``$UCM_COMMIT`` when set (the lent GPU's copy carries a stale .git), else the checkout's HEAD sha, else
    "unknown"."""
    if os.environ.get("UCM_COMMIT"):
        return os.environ["UCM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    """GPU name, or "cpu-<cores>" when no CUDA device is present."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{os.cpu_count()}cores"


def versions() -> dict:
    """Versions of the libraries whose behaviour the figures depend on."""
    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("triton", "numba", "numpy"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            continue
    return found


CPU_FLAGS_OF_NOTE = ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2")  # flags that pick CPU kernels


def host() -> dict:
    """The machine that ran the figures: CPU model, logical cores, and which of :data:`CPU_FLAGS_OF_NOTE` it has
    (vLLM's CPU kernels and oneDNN choose their path by them)."""
    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(),
            "cpu_flags": [f for f in CPU_FLAGS_OF_NOTE if f in flags]}


def row(name: str, impl: str, shape: str, median_ms: float, nbytes: int | None = None,
        ceiling_gbps: float | None = None, baseline_ms: float | None = None, **extra) -> dict:
    """One results row; GB/s, % of ceiling and speedup are derived when their inputs are given."""
    out = {"name": name, "impl": impl, "shape": shape, "median_ms": round(median_ms, 5)}
    if nbytes is not None:
        gbps = nbytes / (median_ms * 1e-3) / 1e9
        out["gbps"] = round(gbps, 2)
        if ceiling_gbps:
            out["pct_of_ceiling"] = round(100.0 * gbps / ceiling_gbps, 1)
    if baseline_ms:
        out["speedup_vs_baseline"] = round(baseline_ms / median_ms, 2)
    out.update(extra)
    return out


def write_results(bench: str, rows: list[dict], ceilings: dict, extra: dict | None = None) -> Path:
    """Write ``<bench>-<gpu>-<date>-<commit>.json`` (the commit's first 7 hex digits; left out when unknown) under
    ``$OUT`` (lent GPU) or ``bench/results/``; return its path. Two runs of one day on different trees keep
    their own files."""
    date = datetime.date.today().isoformat()
    gpu = device_name()
    commit = git_commit()
    doc = {"bench": bench, "gpu": gpu, "commit": commit, "date": date, "versions": versions(),
           "host": host(), "ceilings": ceilings, "rows": rows}
    if extra:
        doc.update(extra)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = gpu.replace(" ", "_").replace("/", "_")
    tag = f"-{commit[:7]}" if len(commit) >= 7 and all(c in "0123456789abcdef" for c in commit.lower()) else ""
    path = out_dir / f"{bench}-{slug}-{date}{tag}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def run_shapes(bench: str, shapes, shape_rows, extra: dict | None = None) -> list[dict]:
    """The GPU run of a benchmark over ``shapes`` ((batch, context) pairs): the copy ceilings measured first, then
    ``shape_rows(batch, context)`` per shape (seeded, the allocator's cache emptied after each), the JSON rewritten
    after every shape so a run cut short keeps the shapes it finished; returns the rows."""
    torch.manual_seed(0)
    ceilings = measure_copy_ceilings()
    rows = []
    for batch, context in shapes:
        rows += shape_rows(batch, context)
        torch.cuda.empty_cache()
        path = write_results(bench, rows, ceilings, extra)
    print(f"wrote {path}")
    return rows


def wall_median_ms(run, iters: int) -> float:
    """Median wall time in ms of ``run()`` then a device sync, each call starting on an idle GPU."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cuda_median_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of ``fn()`` in ms, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure_copy_ceilings(nbytes: int = 256 << 20) -> dict:
    """Pinned H2D, D2H, both at once (two streams), HBM device copy (read+write) and HBM read (a sum over bf16) in
    GB/s, measured now."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)
        torch.cuda.current_stream().wait_stream(s1)
        torch.cuda.current_stream().wait_stream(s2)

    h2d = cuda_median_ms(lambda: dev.copy_(host, non_blocking=True))
    d2h = cuda_median_ms(lambda: host.copy_(dev, non_blocking=True))
    bidir = cuda_median_ms(both)
    hbm = cuda_median_ms(lambda: dev2.copy_(dev))
    values = dev.view(torch.bfloat16)  # a probe, not a ceiling: 3.39 TB/s on the H200 where FA3 decode read 4.2
    read = cuda_median_ms(lambda: torch.sum(values, dtype=torch.float32))
    return {"h2d_pinned_gbps": round(nbytes / h2d / 1e6, 2), "d2h_pinned_gbps": round(nbytes / d2h / 1e6, 2),
            "bidir_pinned_gbps": round(2 * nbytes / bidir / 1e6, 2), "hbm_copy_gbps": round(2 * nbytes / hbm / 1e6, 1),
            "hbm_read_gbps": round(nbytes / read / 1e6, 1)}


def run_bench_role(module: str, *argv: str, timeout: float = 900, echo: bool = False) -> dict:
    """Run ``python -m module argv...`` (one vLLM process of a bench) and return the JSON it printed after
    ``UCM_RESULT ``; ``echo``: first print its stdout lines that are JSON objects (progress rows)."""
    done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout)
    if echo:
        print("\n".join(line for line in done.stdout.splitlines() if line.startswith("{")), flush=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("UCM_RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed (rc {done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(lines[-1][len("UCM_RESULT "):])


def random_prompts(lengths, seed: int, vocab: int) -> list[list[int]]:
    """Token-id prompts of the given ``lengths``, ids uniform in [3, vocab), reproducible from ``seed``."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
