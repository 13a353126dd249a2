"""KV block offload/load between a paged GPU cache and pinned host memory (issue 4), on the lent GPU.

Run from the repository root: ``python -m bench.bench_kv_transfer`` (one run; JSON under ``$OUT`` or
``bench/results/``). Cache: Llama-3.1-8B-like, 32 layers of ``(2, num_blocks, 16, 8, 128)`` bf16 (FlashAttention
layout, 64 KiB per layer-block, 2 MiB per block), blocks at random positions. In the same run: the pinned copy
ceilings, the seed's section 6.2 loop verbatim, ``offload_blocks`` / ``load_blocks`` with each strategy
("direct": one kernel on pinned memory; "staged": kernel into GPU slots pipelined with DMA) from 1 block
(where the "auto" threshold is decided) to 16K blocks, both directions at once, and the baselines (a per-block
``copy_`` loop on a 64-block subset, ``index_select`` + one copy up to 4K blocks). Every case is checked bit
for bit (ragged ids with -1 entries, poisoned destination, untouched blocks) before it is timed; a failing
section is reported, the others still run, and the exit status is 1.
"""
import argparse
import contextlib
import functools
import io
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.harness import measure_copy_ceilings, row, wall_median_ms, write_results
from ucm_kernels.kv_transfer import PagedKVLayout, block_segments, detect_layout
from ucm_kernels.kv_transfer.torch import gather_blocks as torch_gather_blocks
from ucm_store.transport import DIRECT_MAX_BYTES, CUDATransport

NUM_LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 32, 16, 8, 128
CHECK_ROWS = 1024  # rows compared per step when checking (2 GiB on the GPU)
PER_BLOCK_SUBSET = 64  # blocks moved by the per-block copy_ baseline (64 copies of 32 KiB each)
INDEX_SELECT_MAX_BLOCKS = 4096
DMA_CHUNK_BYTES = 256 << 20  # copy size of the same-rows DMA ceiling
TUNE_CHUNK_MIB, TUNE_SLOTS = (32, 64, 128, 256), (2, 3)  # staging slot grid of --tune
STRATEGIES = ("staged", "direct")
SHAPE = f"llama8b {NUM_LAYERS}L (2,nb,{BLOCK_SIZE},{KV_HEADS},{HEAD_DIM}) bf16"


SEED_6_2 = Path(__file__).resolve().parents[1] / "tests" / "seed_snippets" / "section_6_2_transfer_speed.py"


def seed_benchmark():
    """The seed's section 6.2 function, from the verbatim copy the tests also run (it uses a module-level ``time``)."""
    namespace = {"time": time}
    exec(compile(SEED_6_2.read_text(), str(SEED_6_2), "exec"), namespace)
    return namespace["benchmark_transfer_speed"]


def run_seed_benchmark() -> dict[int, float]:
    """Run the seed's loop, echo its output, and return its printed GB/s per size in MB."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        seed_benchmark()()
    print(printed.getvalue(), end="")
    return {int(mb): float(gbps) for mb, gbps in re.findall(r"^\s*(\d+) MB: ([\d.]+) GB/s", printed.getvalue(), re.M)}


def raw_torch_loop() -> dict[int, float]:
    """Baseline for the seed loop: the same 20 timed iterations with a bare ``copy_`` on the current stream and a
    stream sync, from a torch-pinned tensor. Its GB/s is the ceiling of any copy-then-synchronize API."""
    result = {}
    for size_mb in (1, 4, 16, 64, 256):
        size = size_mb * 1024 * 1024
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        gpu = torch.empty(size, dtype=torch.uint8, device="cuda:0")
        stream = torch.cuda.current_stream()
        for _ in range(5):
            gpu.copy_(pinned, non_blocking=True)
            stream.synchronize()
        start = time.time()
        for _ in range(20):
            gpu.copy_(pinned, non_blocking=True)
            stream.synchronize()
        result[size_mb] = round(size * 20 / (time.time() - start) / 1e9, 1)
    return result


def iterations(nbytes: int) -> int:
    return 30 if nbytes <= 64 << 20 else 10 if nbytes <= 8 << 30 else 5


def with_padding(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with every 32nd entry (at random) set to -1, for the ragged-batch check (none below 32 ids)."""
    padded = ids.clone()
    padded[torch.randperm(len(ids))[:len(ids) // 32]] = -1
    return padded


def check_rows(cache: list[torch.Tensor], layout: PagedKVLayout, ids: torch.Tensor, rows: torch.Tensor,
               poisoned: bool) -> None:
    """Raise unless host ``rows[i]`` equals cache block ``ids[i]`` for every id >= 0; with ``poisoned``, rows of
    -1 ids must still hold the 0xFF poison."""
    for start in range(0, len(ids), CHECK_ROWS):
        chunk = ids[start:start + CHECK_ROWS].cuda()
        got = rows[start:start + len(chunk)].cuda()
        expected = torch.full_like(got, 0xFF) if poisoned else got.clone()
        torch_gather_blocks(cache, chunk, expected.view(layout.staging_shape(len(chunk))), layout)
        if not torch.equal(got, expected):
            raise AssertionError(f"rows {start}..{start + len(chunk)} differ from the cache blocks they hold")


def block_checksums(cache: list[torch.Tensor], layout: PagedKVLayout) -> torch.Tensor:
    """[num_layers, num_blocks, num_segments] wrapping int64 sums of each segment's 8-byte words."""
    return torch.stack([block_segments(layer, layout).view(torch.int64).sum(-1) for layer in cache])


class Bench:
    """Cache, pinned rows and transport shared by every case; ``rows`` collects the results."""

    def __init__(self, args):
        self.transport = CUDATransport(device_id=0)
        self.cache = [torch.randn(2, args.num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                                  device="cuda") for _ in range(NUM_LAYERS)]
        self.layout = detect_layout(self.cache)
        self.num_rows = min(args.pinned_gib * (1 << 30) // self.layout.row_bytes, args.num_blocks)
        self.pinned = self.transport.get_pinned_buffer(self.num_rows * self.layout.row_bytes)
        self.host_rows = self.pinned.view(self.num_rows, self.layout.row_bytes)
        self.order = torch.randperm(args.num_blocks)
        self.ceilings = {}
        self.rows = []
        self.baseline_ms = {}

    def ids(self, n: int, second_set: bool = False) -> torch.Tensor:
        """n distinct random block ids; the second set is disjoint from the first while 2n <= num_blocks."""
        return self.order[-n:] if second_set else self.order[:n]

    def offload(self, ids, strategy, first_row=0):
        return self.transport.offload_blocks(self.cache, ids, self.host_rows[first_row:], strategy=strategy)

    def load(self, ids, strategy, first_row=0):
        return self.transport.load_blocks(self.host_rows[first_row:], ids, self.cache, strategy=strategy)

    def verify_offload(self, run, ids: torch.Tensor, first_row: int = 0) -> None:
        """Poison rows, ``run()`` an offload of ``ids`` into them, check every row."""
        rows = self.host_rows[first_row:first_row + len(ids)]
        rows.fill_(0xFF)
        run()
        check_rows(self.cache, self.layout, ids, rows, poisoned=True)

    def verify_load(self, run, ids: torch.Tensor, first_row: int = 0) -> None:
        """Poison the target blocks, ``run()`` a load of ``ids``, check them and every other block."""
        valid = ids[ids >= 0].cuda()
        for layer in self.cache:
            block_segments(layer, self.layout)[valid] = 0xFF
        before = block_checksums(self.cache, self.layout)
        run()
        check_rows(self.cache, self.layout, ids, self.host_rows[first_row:first_row + len(ids)], poisoned=False)
        untouched = torch.ones(self.layout.num_blocks, dtype=torch.bool, device="cuda")
        untouched[valid] = False
        if not torch.equal(block_checksums(self.cache, self.layout)[:, untouched], before[:, untouched]):
            raise AssertionError("the load changed blocks outside its block ids")

    def add(self, name: str, impl: str, n: int, ms: float, ceiling_key: str, directions: int = 1, **extra):
        nbytes = directions * n * self.layout.row_bytes
        result = row(name, impl, f"{SHAPE}, {n} blocks", ms, nbytes=nbytes, ceiling_gbps=self.ceilings.get(ceiling_key),
                     baseline_ms=self.baseline_ms.get((name, n)), blocks=n, **extra)
        if (name, "per_block") in self.baseline_ms:
            per_block_gbps = self.layout.row_bytes * PER_BLOCK_SUBSET / self.baseline_ms[(name, "per_block")] / 1e6
            result["speedup_vs_per_block_copy"] = round(result["gbps"] / per_block_gbps, 1)
        self.rows.append(result)
        print(f"  {name:26s} {impl:22s} {n:6d} blocks {nbytes / ms / 1e6:7.1f} GB/s", flush=True)

    def one_way(self, n: int, strategy: str) -> None:
        """Check, then time, an offload and a load of n blocks with one strategy."""
        moved = n * self.layout.row_bytes
        picked = strategy == ("direct" if moved <= DIRECT_MAX_BYTES else "staged")
        for name, move, verify, second_set, ceiling in (
                ("offload_gpu_to_pinned", self.offload, self.verify_offload, False, "d2h_pinned_gbps"),
                ("load_pinned_to_gpu", self.load, self.verify_load, True, "h2d_pinned_gbps")):
            padded, ids = with_padding(self.ids(n, second_set)), self.ids(n, second_set)
            verify(lambda: self.transport.synchronize(move(padded, strategy)), padded)
            verify(lambda: self.transport.synchronize(move(ids, strategy)), ids)
            ms = wall_median_ms(lambda: self.transport.synchronize(move(ids, strategy)), iterations(moved))
            self.add(name, f"ucm_{strategy}", n, ms, ceiling, auto_picks=picked)

    def tune_staging(self, n: int, chunk_mib: int, num_slots: int) -> None:
        """Both directions at once through a transport with other staging slots (``--tune``)."""
        default, self.transport = self.transport, CUDATransport(0, chunk_bytes=chunk_mib << 20, num_slots=num_slots)
        try:
            self.both_ways(n, "staged", impl=f"ucm_staged_{chunk_mib}MiBx{num_slots}")
        finally:
            self.transport = default

    def both_ways(self, n: int, strategy: str, impl: str | None = None) -> None:
        """Offload n blocks into rows [0, n) while loading n other blocks from rows [num_rows - n, num_rows)."""
        src_row = self.num_rows - n
        out_ids, in_ids = self.ids(n), self.ids(n, second_set=True)

        def run():
            offload, load = self.offload(out_ids, strategy), self.load(in_ids, strategy, src_row)
            self.transport.synchronize(offload)
            self.transport.synchronize(load)

        self.verify_offload(lambda: self.verify_load(run, in_ids, src_row), out_ids)
        ms = wall_median_ms(run, iterations(2 * n * self.layout.row_bytes))
        self.add("offload_and_load_at_once", impl or f"ucm_{strategy}", n, ms, "bidir_pinned_gbps", directions=2)

    def same_rows_dma(self, n: int) -> None:
        """Ceiling over the very host rows ``both_ways(n)`` uses: bare DMA copies (256 MiB each, from/to one GPU
        buffer per direction) of rows [0, n) to the host and rows [num_rows - n, num_rows) from it, one way each
        and both at once. Host memory placement changes what DMA reaches (measured on the lent H100: 67-88 GB/s
        both ways for 256 MiB windows at different offsets of one 32 GiB pinned buffer)."""
        nbytes, row_bytes = n * self.layout.row_bytes, self.layout.row_bytes
        out_rows = self.pinned[:nbytes]
        in_rows = self.pinned[(self.num_rows - n) * row_bytes:self.num_rows * row_bytes]
        gpu_out, gpu_in = (torch.empty(DMA_CHUNK_BYTES, dtype=torch.uint8, device="cuda") for _ in range(2))
        d2h_stream, h2d_stream = torch.cuda.Stream(), torch.cuda.Stream()
        spans = [(start, min(start + DMA_CHUNK_BYTES, nbytes)) for start in range(0, nbytes, DMA_CHUNK_BYTES)]

        def d2h():
            with torch.cuda.stream(d2h_stream):
                for start, stop in spans:
                    out_rows[start:stop].copy_(gpu_out[:stop - start], non_blocking=True)

        def h2d():
            with torch.cuda.stream(h2d_stream):
                for start, stop in spans:
                    gpu_in[:stop - start].copy_(in_rows[start:stop], non_blocking=True)

        both = lambda: (d2h(), h2d())  # noqa: E731
        for name, run, ceiling, directions in (("dma_same_rows_d2h", d2h, "d2h_pinned_gbps", 1),
                                                 ("dma_same_rows_h2d", h2d, "h2d_pinned_gbps", 1),
                                                 ("dma_same_rows_both", both, "bidir_pinned_gbps", 2)):
            ms = wall_median_ms(run, iterations(directions * nbytes))
            self.add(name, "bare_copy_256MiB", n, ms, ceiling, directions=directions)

    def per_block_baseline(self) -> None:
        """One copy_ per (block, layer, K/V), as peers do, on a subset of blocks."""
        n = PER_BLOCK_SUBSET
        ids = self.ids(n)
        rows = self.host_rows[:n].view(self.layout.staging_shape(n))
        segments = [block_segments(layer, self.layout) for layer in self.cache]
        pairs = [(rows[i, layer, seg], segs[block, seg]) for i, block in enumerate(ids.tolist())
                 for layer, segs in enumerate(segments) for seg in range(2)]

        def offload():
            for host, device in pairs:
                host.copy_(device, non_blocking=True)
            torch.cuda.synchronize()

        def load():
            for host, device in pairs:
                device.copy_(host, non_blocking=True)
            torch.cuda.synchronize()

        for name, run, verify, ceiling in (("offload_gpu_to_pinned", offload, self.verify_offload, "d2h_pinned_gbps"),
                                           ("load_pinned_to_gpu", load, self.verify_load, "h2d_pinned_gbps")):
            verify(run, ids)
            ms = wall_median_ms(run, 3)
            self.add(name, "torch_per_block_copy", n, ms, ceiling)
            self.baseline_ms[(name, "per_block")] = ms

    def index_select_baseline(self, n: int) -> None:
        """index_select of every layer into one GPU buffer, then one copy (load: one copy, then index_put_)."""
        ids, rows = self.ids(n), self.host_rows[:n].view(-1)
        ids_gpu = ids.cuda()
        segments = [block_segments(layer, self.layout) for layer in self.cache]
        staging = torch.empty(self.layout.staging_shape(n), dtype=torch.uint8, device="cuda")

        def offload():
            for layer, segs in enumerate(segments):
                staging[:, layer] = torch.index_select(segs, 0, ids_gpu)
            rows.copy_(staging.view(-1), non_blocking=True)
            torch.cuda.synchronize()

        def load():
            staging.view(-1).copy_(rows, non_blocking=True)
            for layer, segs in enumerate(segments):
                segs[ids_gpu] = staging[:, layer]
            torch.cuda.synchronize()

        for name, run, verify, ceiling in (("offload_gpu_to_pinned", offload, self.verify_offload, "d2h_pinned_gbps"),
                                           ("load_pinned_to_gpu", load, self.verify_load, "h2d_pinned_gbps")):
            verify(run, ids)
            self.baseline_ms[(name, n)] = wall_median_ms(run, iterations(n * self.layout.row_bytes))
            self.add(name, "torch_index_select", n, self.baseline_ms[(name, n)], ceiling)


def attempt(errors: list[str], label: str, fn, *args) -> None:
    """Run one section; on failure print the traceback and record it, so the other sections still run."""
    try:
        fn(*args)
    except Exception as exc:  # reported below and in the JSON; the run exits 1
        traceback.print_exc()
        errors.append(f"{label}: {exc!r}")


def print_table(rows: list[dict], seed: list[dict[int, float]]) -> None:
    print(f"\n{'case':26s} {'impl':22s} {'blocks':>6s} {'GB/s':>7s} {'% ceil':>7s} {'x base':>7s}")
    for r in rows:
        print(f"{r['name']:26s} {r['impl']:22s} {r.get('blocks', 0):6d} {r['gbps']:7.1f} "
              f"{r.get('pct_of_ceiling', float('nan')):7.1f} {r.get('speedup_vs_baseline', float('nan')):7.2f}")
    for run, printed in enumerate(seed):
        print(f"seed 6.2 h2d loop, run {run} (GB/s): " + ", ".join(f"{mb} MB {gbps}" for mb, gbps in printed.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-blocks", type=int, default=20480, help="blocks per layer in the GPU cache")
    parser.add_argument("--sizes", default="1024,4096,16384", help="batch sizes (blocks) of the main rows")
    parser.add_argument("--small-sizes", default="1,2,4,8,32,128", help="batch sizes deciding the auto threshold")
    parser.add_argument("--pinned-gib", type=int, default=32, help="pinned rows to allocate (GiB)")
    parser.add_argument("--tune", action="store_true",
                        help="only both-ways staged rows over staging slot sizes x counts, and the same-rows DMA")
    parser.add_argument("--tune-mib", default="32,64,128,256", help="--tune: staging slot sizes (MiB)")
    parser.add_argument("--tune-slots", default="2,3", help="--tune: staging slot counts")
    parser.add_argument("--seed-runs", type=int, default=3, help="runs of the seed 6.2 loop (before anything else)")
    args = parser.parse_args()
    torch.manual_seed(0)
    errors, seed, raw = [], [], {}
    if not args.tune:  # first, on a quiet host, as a user runs it: before the 32 GiB pinned allocation below
        for _ in range(args.seed_runs):
            attempt(errors, "seed 6.2", lambda: seed.append(run_seed_benchmark()))
        attempt(errors, "raw torch copy+sync loop", lambda: raw.update(raw_torch_loop()))
    bench = Bench(args)
    bench.ceilings = measure_copy_ceilings()
    print("ceilings:", bench.ceilings, flush=True)
    sizes = [n for n in map(int, args.sizes.split(",")) if n <= bench.num_rows]
    small_sizes = [n for n in map(int, args.small_sizes.split(",")) if n <= bench.num_rows]
    both_sizes = sorted({min(n, bench.num_rows // 2, args.num_blocks // 2) for n in sizes})
    tune_grid = [(mib, slots) for mib in map(int, args.tune_mib.split(","))
                 for slots in map(int, args.tune_slots.split(","))]
    sections = tune_sections(bench, both_sizes, tune_grid) if args.tune else default_sections(
        bench, sizes, small_sizes, both_sizes)
    for label, section in sections:
        attempt(errors, label, section)
        path = write_results(
            "kv_transfer_tune" if args.tune else "kv_transfer", seed_rows(seed, bench.ceilings) + bench.rows,
            bench.ceilings, extra={"seed_6_2_gbps_per_run": seed, "raw_torch_copy_sync_loop_gbps": raw,
                                   "direct_max_bytes": DIRECT_MAX_BYTES, "pinned_rows": bench.num_rows,
                                   "cache_blocks": args.num_blocks, "errors": errors})
    print_table(seed_rows(seed, bench.ceilings) + bench.rows, seed)
    print("raw torch copy_ + sync loop (GB/s): " + ", ".join(f"{mb} MB {gbps}" for mb, gbps in raw.items()))
    print(f"results: {path}")
    for error in errors:
        print(f"FAILED {error}")
    return 1 if errors else 0


def default_sections(bench: Bench, sizes, small_sizes, both_sizes) -> list:
    """(label, callable) of a full run: baselines, one way per strategy, both ways per strategy."""
    sections = [(f"index_select {n}", functools.partial(bench.index_select_baseline, n)) for n in sizes
                 if n <= INDEX_SELECT_MAX_BLOCKS]
    sections += [("per-block copy_", bench.per_block_baseline)]
    sections += [(f"one way {s} {n}", functools.partial(bench.one_way, n, s)) for n in sizes + small_sizes
                 for s in STRATEGIES]
    sections += [(f"both ways {s} {n}", functools.partial(bench.both_ways, n, s)) for n in both_sizes
                 for s in STRATEGIES]
    sections += [(f"same-rows DMA {n}", functools.partial(bench.same_rows_dma, n)) for n in both_sizes]
    return sections


def tune_sections(bench: Bench, both_sizes, grid: list[tuple[int, int]]) -> list:
    """(label, callable) of ``--tune``: both ways, staged, per (staging slot MiB, slot count) of ``grid``."""
    return [(f"tune {mib} MiB x {slots} {n}", functools.partial(bench.tune_staging, n, mib, slots))
            for mib, slots in grid for n in both_sizes] + [
        (f"same-rows DMA {n}", functools.partial(bench.same_rows_dma, n)) for n in both_sizes]


def seed_rows(seed: list[dict[int, float]], ceilings: dict) -> list[dict]:
    """The seed loop's printed GB/s as result rows, one per run and size."""
    return [row("seed_6_2_h2d_loop", "ucm_transport_h2d", f"{mb} MB", mb * 2**20 / gbps / 1e6, nbytes=mb * 2**20,
                ceiling_gbps=ceilings["h2d_pinned_gbps"], run=run) for run, printed in enumerate(seed)
            for mb, gbps in printed.items()]


if __name__ == "__main__":
    sys.exit(main())
