"""PNG plots of benchmark results (JSON of docs/benchmarks.md): ours beside the baselines and the ceiling.

One plotter per benchmark; each takes the results document and a PNG path:

* ``kv_transfer`` -> ``transfer.png``: GB/s against bytes per call for offload, load and both at once, UCM's
  strategies beside ``index_select`` + copy, per-block ``copy_`` and the seed's 6.2 loop, under the pinned-copy
  ceilings measured in the same run;
* ``sparse_decode`` -> ``sparse_speedup.png``: select + attend speedup over dense SDPA against context length,
  per batch size, under the ideal speedup (dense KV bytes / selected KV bytes);
* ``sparse_quality`` -> ``quality.png``: attention-mass recall and needle hit rate against sparse_ratio, beside
  dense attention (1.0) and a random choice of as many blocks (expected recall = share of tokens attended);
* ``e2e_ttft`` -> ``ttft.png``: time to first token cold and warm, UCM beside no connector and ExampleConnector;
* ``hit_rate`` -> ``hit_rate.png``: prefix hit rate against cache capacity under the ideal hit rate;
* ``store`` -> ``store.png``: Posix and Cache tier GB/s beside raw file I/O and memcpy of the same bytes (the
  baselines; the disk's own speed bounds both).

Usage: ``python -m bench.plots [RESULTS_DIR] [--out DIR]`` renders the newest file of each benchmark found
(default: ``bench/results/`` into ``bench/results/plots/``). Needs matplotlib (``pip install 'ucm[bench]'``).
"""
import argparse
import json
import re
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CEILING_STYLE = dict(color="black", ls="--", lw=1.2)
BASELINE_COLOR = "tab:gray"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(doc: dict, what: str) -> str:
    return f"{what}\n{doc['gpu']}, {doc['date']}, commit {doc['commit'][:10]}"


def _rows(doc: dict, name: str, impl: str | None = None) -> list[dict]:
    rows = [r for r in doc["rows"] if r["name"] == name and (impl is None or r["impl"] == impl)]
    modes = {r.get("mode") for r in rows}
    return [r for r in rows if r.get("mode") == "cuda_graph"] if "cuda_graph" in modes else rows


def _mib_moved(r: dict) -> float:
    return r["gbps"] * 1e9 * r["median_ms"] * 1e-3 / (1 << 20)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


# ---- kv_transfer ---------------------------------------------------------------------------------------------
TRANSFER_IMPLS = {"ucm_staged": ("UCM staged (gather + DMA)", "tab:blue", "o"),
                  "ucm_direct": ("UCM direct (kernel on pinned)", "tab:orange", "s"),
                  "torch_index_select": ("kv[:, ids] + one copy", BASELINE_COLOR, "^"),
                  "torch_per_block_copy": ("per-block copy_ loop", "tab:red", "v"),
                  "ucm_transport_h2d": ("seed 6.2 loop (h2d + sync)", "tab:green", "d")}
TRANSFER_PANELS = (("offload_gpu_to_pinned", "offload GPU -> pinned", "d2h_pinned_gbps", "D2H"),
                   ("load_pinned_to_gpu", "load pinned -> GPU", "h2d_pinned_gbps", "H2D"),
                   ("offload_and_load_at_once", "both directions at once", "bidir_pinned_gbps", "both ways"))


def plot_transfer(doc: dict, path: Path) -> Path:
    """GB/s against MiB per call, one panel per direction, with the measured pinned-copy ceiling."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    for ax, (name, label, ceiling_key, ceiling_label) in zip(axes, TRANSFER_PANELS):
        seed_loop = [r for r in _rows(doc, "seed_6_2_h2d_loop") if r.get("run", 0) == 0]  # first of the runs
        rows = _rows(doc, name) + (seed_loop if name == "load_pinned_to_gpu" else [])
        for impl, (text, color, marker) in TRANSFER_IMPLS.items():
            points = sorted((_mib_moved(r), r["gbps"]) for r in rows if r["impl"] == impl)
            if points:
                ax.plot(*zip(*points), marker=marker, color=color, label=text)
        ceiling = doc["ceilings"].get(ceiling_key)
        if ceiling:
            ax.axhline(ceiling, **CEILING_STYLE, label=f"ceiling: pinned {ceiling_label} {ceiling:.1f} GB/s")
        ax.set(xscale="log", xlabel="data moved per call (MiB)", title=label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("bandwidth (GB/s)")
    fig.suptitle(_title(doc, "KV block transfer, Llama-3.1-8B-like blocks (2 MiB across 32 layers)"))
    return _save(fig, path)


# ---- sparse_decode -------------------------------------------------------------------------------------------
SHAPE_RE = re.compile(r"b(\d+)_ctx(\d+)_(.+)")
SPEEDUP_TICKS = (0.1, 0.25, 0.5, 1, 2, 3, 4, 8, 16, 32, 64, 128)
BATCH_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def plot_sparse_speedup(doc: dict, path: Path) -> Path:
    """Select + attend speedup over dense SDPA against context, per batch; ideal = dense / selected KV bytes."""
    plt = _pyplot()
    by_shape = [(SHAPE_RE.fullmatch(r["shape"]), r) for r in _rows(doc, "select_attend")]
    selections = sorted({m.group(3) for m, _ in by_shape if m})
    fig, axes = plt.subplots(1, len(selections), figsize=(7 * len(selections), 4.8), squeeze=False)
    ideal = {(m.group(2), m.group(3)): int(m.group(2)) / r["mean_tokens_per_head"]
             for m, r in ((SHAPE_RE.fullmatch(r["shape"]), r) for r in _rows(doc, "sparse_attend")) if m}
    for ax, selection in zip(axes[0], selections):
        batches = sorted({int(m.group(1)) for m, _ in by_shape if m and m.group(3) == selection})
        for color, batch in zip(BATCH_COLORS, batches):
            for impl, style in (("ucm_quest", "-"), ("ucm_quest_fp8", "--"), ("ucm_mean", ":")):
                points = sorted((int(m.group(2)), r["speedup_vs_baseline"]) for m, r in by_shape
                                if m and m.group(3) == selection and int(m.group(1)) == batch and r["impl"] == impl)
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=color, label=f"batch {batch}, {impl[4:]} rule")
        bound = sorted((int(ctx), x) for (ctx, sel), x in ideal.items() if sel == selection)
        if bound:
            ax.plot(*zip(*bound), **CEILING_STYLE, marker="x", label="ideal: dense KV bytes / selected KV bytes")
        ax.axhline(1.0, color=BASELINE_COLOR, lw=2, label="dense SDPA (baseline)")
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="speedup over dense SDPA (x)",
               title=f"GSA select + sparse attend, {selection}")
        ax.minorticks_off()
        contexts = sorted({int(m.group(2)) for m, _ in by_shape if m})
        ax.set_xticks(contexts, [f"{c // 1024}K" for c in contexts])
        low, high = ax.get_ylim()
        ticks = [t for t in SPEEDUP_TICKS if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(_title(doc, "Sparse decode speedup (bf16, 32 q / 8 kv heads, d=128, block 16)"))
    return _save(fig, path)


# ---- sparse_quality ------------------------------------------------------------------------------------------
SCENARIO_COLORS = {"needle": "tab:blue", "structured": "tab:orange", "diffuse": "tab:green"}


def plot_quality(doc: dict, path: Path) -> Path:
    """Attention-mass recall and needle hit rate against sparse_ratio (largest context in the file)."""
    plt = _pyplot()
    context = max(int(re.search(r"ctx(\d+)", r["shape"]).group(1)) for r in doc["rows"])
    rows = [r for r in doc["rows"] if f"ctx{context}_" in r["shape"] + "_"]
    fig, (recall_ax, needle_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for scenario, color in SCENARIO_COLORS.items():
        for impl, style in (("gsa_quest", "-"), ("gsa_quest_fp8", ":"), ("gsa_mean", "--")):
            points = sorted((r["sparse_ratio"], r) for r in rows if r["name"] == scenario and r["impl"] == impl)
            if not points:
                continue
            ratios = [x for x, _ in points]
            recall_ax.plot(ratios, [r["mass_recall_mean"] for _, r in points], style, marker="o", color=color,
                           label=f"{scenario}, {impl[4:]} rule")
            if "needle_hit_rate" in points[0][1]:
                needle_ax.plot(ratios, [r["needle_hit_rate"] for _, r in points], style, marker="o", color=color,
                               label=f"{scenario}, {impl[4:]} rule")
    attended = sorted({(r["sparse_ratio"], r["blocks_attended"]) for r in rows if r["impl"] == "gsa_quest"})
    recall_ax.plot(*zip(*attended), color=BASELINE_COLOR, lw=2, label="random blocks, as many (expected recall)")
    target = doc.get("targets", {}).get("mass_recall")
    if target:
        recall_ax.axhline(target, color="tab:red", lw=0.8, ls="-.", label=f"target recall {target}")
    for ax, what in ((recall_ax, "attention-mass recall"), (needle_ax, "needle hit rate")):
        ax.axhline(1.0, **CEILING_STYLE, label="dense attention (ceiling)")
        ax.set(xlabel="sparse_ratio (share of blocks attended)", ylabel=what, ylim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(doc, f"GSA selection quality vs dense attention, {context}-token context"))
    return _save(fig, path)


# ---- e2e_ttft ------------------------------------------------------------------------------------------------
TTFT_IMPLS = {"none": ("no connector (baseline)", BASELINE_COLOR),
              "ucm_cold": ("UCM cold", "tab:cyan"),
              "ucm_warm_dram": ("UCM warm, DRAM", "tab:blue"),
              "ucm_warm_disk": ("UCM warm, disk (new process)", "navy"),
              "example_cold": ("ExampleConnector cold", "moccasin"),
              "example_warm": ("ExampleConnector warm", "tab:orange")}


def plot_ttft(doc: dict, path: Path) -> Path:
    """Median TTFT per prompt length, bars per configuration (log scale)."""
    plt = _pyplot()
    rows = _rows(doc, "ttft")
    lengths = sorted({r["prompt_tokens"] for r in rows})
    impls = [i for i in TTFT_IMPLS if any(r["impl"] == i for r in rows)]
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for k, impl in enumerate(impls):
        ms = {r["prompt_tokens"]: r["median_ms"] for r in rows if r["impl"] == impl}
        xs = [i + (k - (len(impls) - 1) / 2) * width for i, n in enumerate(lengths) if n in ms]
        label, color = TTFT_IMPLS[impl]
        ax.bar(xs, [ms[n] for n in lengths if n in ms], width, label=label, color=color, edgecolor="black", lw=0.4)
    ax.set_xticks(range(len(lengths)), [f"{n} tokens" for n in lengths])
    ax.set(yscale="log", ylabel="time to first token (ms)", xlabel="prompt length")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8, ncol=3)
    fig.suptitle(_title(doc, "End-to-end TTFT, cold vs warm prefix (vLLM, tiny dummy Llama)"))
    return _save(fig, path)


# ---- hit_rate ------------------------------------------------------------------------------------------------
def plot_hit_rate(doc: dict, path: Path) -> Path:
    """Prefix hit rate against cache capacity (and the DRAM share of hits), under the ideal hit rate."""
    plt = _pyplot()
    rows = _rows(doc, "prefix_hit_rate")
    fig, (hit_ax, dram_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for impl, label, color in (("ucm_cache", "Cache (DRAM only)", "tab:orange"),
                               ("ucm_cache_posix", "Cache|Posix", "tab:blue")):
        points = sorted((r["cache_capacity"], r) for r in rows if r["impl"] == impl)
        caps = [c for c, _ in points]
        hit_ax.plot(caps, [100 * r["hit_rate"] for _, r in points], marker="o", color=color, label=label)
        dram_ax.plot(caps, [100 * r["dram_hit_share"] for _, r in points], marker="o", color=color, label=label)
    ideal = doc["ceilings"]["ideal_hit_rate"]
    hit_ax.axhline(100 * ideal, **CEILING_STYLE, label=f"ideal (nothing forgotten): {100 * ideal:.1f}%")
    hit_ax.axhline(0, color=BASELINE_COLOR, lw=2, label="no store (baseline): 0%")
    hit_ax.axhline(50, color="tab:red", lw=0.8, ls="-.", label="seed 7.2 warning threshold: 50%")
    hit_ax.set(ylabel="prefix hit rate (% of prompt blocks)", ylim=(-3, 103))
    dram_ax.set(ylabel="hits served by the DRAM tier (%)", ylim=(-3, 103))
    caps = sorted({r["cache_capacity"] for r in rows})
    for ax in (hit_ax, dram_ax):
        ax.set(xscale="log", xlabel="cache_capacity (blocks)")
        ax.minorticks_off()
        ax.set_xticks(caps, [str(c) for c in caps])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(_title(doc, f"Prefix hit rate, multi-turn chat ({rows[0]['shape'].split('; ')[-1]})"))
    return _save(fig, path)


# ---- store ---------------------------------------------------------------------------------------------------
STORE_GROUPS = (("dump_commit", "raw_write_fsync_rename", "ucm_posix", "Posix dump + commit"),
                ("load", "raw_read", "ucm_posix", "Posix load (cold page cache)"),
                ("load", "memcpy", "ucm_cache", "Cache tier load"))


def plot_store(doc: dict, path: Path) -> Path:
    """UCM's Posix and Cache tiers beside raw file I/O and memcpy of the same bytes (the baselines)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    labels = []
    for i, (name, ceiling_impl, ours_impl, label) in enumerate(STORE_GROUPS):
        rows = {r["impl"]: r for r in _rows(doc, name)}
        if ceiling_impl not in rows or ours_impl not in rows:
            continue
        ax.bar(i - 0.2, rows[ceiling_impl]["gbps"], 0.4, color=BASELINE_COLOR, edgecolor="black", lw=0.4,
               label="baseline: raw file I/O / memcpy of the same bytes" if not labels else None)
        ax.bar(i + 0.2, rows[ours_impl]["gbps"], 0.4, color="tab:blue", edgecolor="black", lw=0.4,
               label="UCM" if not labels else None)
        ax.annotate(f"{rows[ours_impl]['gbps']:.2f}", (i + 0.2, rows[ours_impl]["gbps"]), ha="center", va="bottom")
        labels.append((i, label))
    ax.set_xticks([i for i, _ in labels], [text for _, text in labels])
    ax.set(ylabel="throughput (GB/s)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle(_title(doc, f"Store tiers on this machine ({doc['rows'][0]['shape']})"))
    return _save(fig, path)


PLOTTERS = {"kv_transfer": ("transfer.png", plot_transfer),
            "sparse_decode": ("sparse_speedup.png", plot_sparse_speedup),
            "sparse_quality": ("quality.png", plot_quality),
            "e2e_ttft": ("ttft.png", plot_ttft),
            "hit_rate": ("hit_rate.png", plot_hit_rate),
            "store": ("store.png", plot_store)}


def render(docs: list[dict], out_dir: Path) -> list[Path]:
    """Plot each document whose benchmark has a plotter (the newest per benchmark); the PNG paths written."""
    newest: dict[str, dict] = {}
    for doc in docs:
        if doc["bench"] in PLOTTERS and doc["date"] >= newest.get(doc["bench"], {"date": ""})["date"]:
            newest[doc["bench"]] = doc
    out_dir.mkdir(parents=True, exist_ok=True)
    return [PLOTTERS[bench][1](doc, out_dir / PLOTTERS[bench][0]) for bench, doc in sorted(newest.items())]


def load_results(paths) -> list[dict]:
    """The results documents in ``paths`` (JSON files of docs/benchmarks.md), sorted by name."""
    return [json.loads(Path(p).read_text()) for p in sorted(paths)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR, help="directory of results JSON")
    parser.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: RESULTS/plots)")
    args = parser.parse_args(argv)
    for path in render(load_results(args.results.glob("*.json")), args.out or args.results / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
