"""GSA offload mode on the GPU: decode tokens/s at 128K context x batch 8 against on-device dense and on-device GSA,
hot-piece hit rate, PCIe bytes per token, prefetch on against off.

One run, Llama-like layer geometry (32 query / 8 KV heads, head_dim 128, block 16, bf16), LAYERS layers, 8 requests
with CONTEXT-token prompts. Keys come in topic chunks (a chunk's keys share a direction, plus noise) and each
request's decode queries drift a little per step around a few topics, so consecutive selections overlap as in real
decoding. GSA: sparse_ratio 0.3, windows init 1 / local 4, min 8 blocks, Quest; a piece is one (block, KV head).

Schedules (the same token streams per request in every mode):
* ``steady``: the 8 requests decode every step; hot budget 1.25x one step's selection.
* ``alternating``: requests 0-3 and 4-7 take turns (4 per step); hot budget 1.25x one group's selection, so a
  group's pieces are evicted while the other runs and come back by prefetch (prefetch_ahead 2) or as misses.

Modes: ``dense`` (our dense_decode kernel over the paged cache), ``gsa`` (on-device GSA), ``offload`` with prefetch off
(prefetch_ahead 0) and on. Correctness first, on the same steps that are timed: every offload output is compared
with on-device GSA's (bit-for-bit equality reported, closeness required) and GSA's error against dense reported.
Times: wall clock per decode step (all layers, token writes included), median over STEPS after WARMUP, synchronized.
The pinned H2D ceiling is measured in the same run.

Usage, from the repo root on the GPU: ``python -m bench.bench_gsa_offload`` (JSON under $OUT or bench/results/);
``--smoke`` runs tiny shapes (CPU works) to check the script.
"""
import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from bench.harness import measure_copy_ceilings, row, write_results
from ucm_sparse import GSA, GSAConfig
from ucm_sparse.offload import OffloadedGSA
from ucm_sparse.ops import attend, num_selected, resolve_backend
from ucm_store.backends.cache import CacheTier
from ucm_store.pool import PinnedMemoryPool

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
GROUP = NUM_Q_HEADS // NUM_KV_HEADS
CONFIG = GSAConfig(sparse_ratio=0.3, init_window_sz=1, local_window_sz=4, min_blocks=8, score="quest",
                   prefetch_workers=4, prefetch_ahead=2, max_pending_prefetch=512, offload=True)
BUDGET_SLACK = 1.25  # hot budget / one step's selection
QUERY_DRIFT = 0.05  # per-step drift of a decode query, relative to its norm
MAX_REL_ERROR = 2e-2  # offload against on-device GSA: they should be equal; closeness is required


@dataclass(frozen=True)
class Shape:
    batch: int = 8
    context: int = 131072 - 64  # prompt tokens: prompt + decode fit 8192 blocks (the host KV is 4 GiB per layer)
    layers: int = 2
    warmup: int = 3
    steps: int = 12

    @property
    def table_blocks(self) -> int:
        return -(-(self.context + self.warmup + self.steps) // BLOCK)


@dataclass
class Workload:
    """Per request: the decode token streams (q, k, v per layer and step); prompts are regenerated from seeds."""

    shape: Shape
    device: torch.device
    queries: dict = field(default_factory=dict)  # (request, layer) -> [steps, NUM_Q_HEADS, HEAD_DIM]
    keys: dict = field(default_factory=dict)  # (request, layer) -> [steps, NUM_KV_HEADS, HEAD_DIM]
    values: dict = field(default_factory=dict)

    def prompt(self, request: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values) ``[context, heads, dim]`` and the unit topic directions ``[topics, heads, dim]``."""
        gen = torch.Generator(self.device).manual_seed(1000 * layer + request)
        context = self.shape.context
        topics = torch.randn(context // 32 + 1, NUM_KV_HEADS, HEAD_DIM, device=self.device, generator=gen)
        topics = topics / topics.norm(dim=-1, keepdim=True)
        lengths = torch.randint(16, 113, (context // 32 + 1,), device=self.device, generator=gen)
        chunk = torch.repeat_interleave(torch.arange(len(lengths), device=self.device), lengths)[:context]
        keys = HEAD_DIM ** 0.5 * topics[chunk] + 0.5 * torch.randn(context, NUM_KV_HEADS, HEAD_DIM,
                                                                     device=self.device, generator=gen)
        values = torch.randn(context, NUM_KV_HEADS, HEAD_DIM, device=self.device, generator=gen)
        return keys.to(DTYPE), values.to(DTYPE), topics

    def build_streams(self) -> None:
        steps = self.shape.warmup + self.shape.steps
        for request in range(self.shape.batch):
            for layer in range(self.shape.layers):
                _, _, topics = self.prompt(request, layer)
                gen = torch.Generator(self.device).manual_seed(7919 + 1000 * layer + request)
                picked = torch.randint(0, len(topics), (8,), device=self.device, generator=gen)
                weights = 2.0 + 6.0 * torch.rand(8, NUM_KV_HEADS, 1, device=self.device, generator=gen)
                centre = (weights * topics[picked]).sum(0)  # [heads, dim]: logits of a few topics 2..8 above
                noise = torch.randn(steps, NUM_Q_HEADS, HEAD_DIM, device=self.device, generator=gen)
                drift = torch.cumsum(noise, 0) * QUERY_DRIFT * centre.norm(dim=-1).mean() / HEAD_DIM ** 0.5
                spread = 0.3 * noise[0] * centre.norm(dim=-1).mean() / HEAD_DIM ** 0.5  # heads of a group differ
                self.queries[request, layer] = (centre.repeat_interleave(GROUP, 0) + spread + drift).to(DTYPE)
                token_topic = topics[torch.randint(0, len(topics), (steps,), device=self.device, generator=gen)]
                self.keys[request, layer] = (HEAD_DIM ** 0.5 * token_topic + 0.5 * torch.randn(
                    steps, NUM_KV_HEADS, HEAD_DIM, device=self.device, generator=gen)).to(DTYPE)
                self.values[request, layer] = torch.randn(steps, NUM_KV_HEADS, HEAD_DIM, device=self.device,
                                                          generator=gen).to(DTYPE)


def schedule(shape: Shape, name: str) -> list[list[int]]:
    """The requests each step decodes."""
    everyone = list(range(shape.batch))
    half = shape.batch // 2
    steps = shape.warmup + shape.steps
    if name == "steady":
        return [everyone] * steps
    return [everyone[:half] if step % 2 == 0 else everyone[half:] for step in range(steps)]


class PagedKV:
    """The on-device paged cache (K, V views of one tensor per layer), shuffled physical blocks."""

    def __init__(self, workload: Workload):
        shape, device = workload.shape, workload.device
        blocks = shape.batch * shape.table_blocks
        self.kv = [torch.empty(2, blocks, BLOCK, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
                   for _ in range(shape.layers)]
        self.table = torch.randperm(blocks, device=device).view(shape.batch, shape.table_blocks).int()
        for request in range(shape.batch):
            for layer in range(shape.layers):
                keys, values, _ = workload.prompt(request, layer)
                self.write(layer, request, 0, keys, values)

    def write(self, layer: int, request: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Tokens ``start ..`` of one request."""
        positions = torch.arange(start, start + keys.shape[0], device=keys.device)
        physical = self.table[request, positions // BLOCK].long()
        self.kv[layer][0, physical, positions % BLOCK] = keys
        self.kv[layer][1, physical, positions % BLOCK] = values

    def write_tokens(self, layer: int, table: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor) -> None:
        """One token per row of ``table`` at ``positions`` (``[b]``), all rows at once."""
        positions = positions.long()
        physical = table.long().gather(1, (positions // BLOCK)[:, None])[:, 0]
        self.kv[layer][0, physical, positions % BLOCK] = keys
        self.kv[layer][1, physical, positions % BLOCK] = values


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(workload: Workload, steps: list[list[int]], step_fn) -> tuple[list[float], list[dict]]:
    """Run ``step_fn(requests, positions, step) -> {layer: out}`` per step; wall ms per step and the outputs."""
    done = {r: 0 for r in range(workload.shape.batch)}
    times, outputs = [], []
    for step, requests in enumerate(steps):
        sync(workload.device)
        start = time.perf_counter()
        outputs.append(step_fn(requests, [done[r] for r in requests], step))
        sync(workload.device)
        times.append((time.perf_counter() - start) * 1e3)
        for r in requests:
            done[r] += 1
    return times, outputs


def token_batch(workload: Workload, requests: list[int], positions: list[int], layer: int):
    """q ``[b, NUM_Q_HEADS, HEAD_DIM]``, k and v ``[b, NUM_KV_HEADS, HEAD_DIM]`` of each request's next token."""
    return tuple(torch.stack([streams[r, layer][i] for r, i in zip(requests, positions)])
                 for streams in (workload.queries, workload.keys, workload.values))


def run_on_device(workload: Workload, cache: PagedKV, steps: list[list[int]], sparse: bool):
    """Dense attention (our kernel) or on-device GSA over the paged cache."""
    shape = workload.shape
    gsa = GSA(replace(CONFIG, offload=False), block_size=BLOCK)

    def step_fn(requests, positions, step):
        lens = torch.tensor([shape.context + i + 1 for i in positions], dtype=torch.int32, device=workload.device)
        table = cache.table[requests]
        plan = gsa.plan(requests, lens, table) if sparse else None
        out = {}
        for layer in range(shape.layers):
            q, k, v = token_batch(workload, requests, positions, layer)
            cache.write_tokens(layer, table, lens - 1, k, v)
            if sparse:
                out[layer] = gsa.run(plan, layer, q, cache.kv[layer][0], cache.kv[layer][1])
            else:
                out[layer] = attend(resolve_backend("auto", q), q, cache.kv[layer][0], cache.kv[layer][1], table,
                                    lens, None, None)
        return out

    return decode(workload, steps, step_fn)


def run_offload(workload: Workload, steps: list[list[int]], budget_blocks: int, ahead: int, pool) -> tuple:
    """OffloadedGSA: prompts written to the host KV, then the decode steps; returns times, outputs, stats."""
    shape = workload.shape
    config = replace(CONFIG, gpu_budget_blocks=budget_blocks, prefetch_ahead=ahead)
    gsa = OffloadedGSA(config, num_layers=shape.layers, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                       block_size=BLOCK, host_blocks=shape.batch * shape.table_blocks, dtype=DTYPE,
                       device=workload.device, cache=CacheTier(shape.layers, pool))
    for request in range(shape.batch):
        for layer in range(shape.layers):
            keys, values, _ = workload.prompt(request, layer)
            gsa.write_prompt(request, layer, keys, values)
    snapshot = {}

    def step_fn(requests, positions, step):
        if step == shape.warmup:
            snapshot.update(vars(gsa.stats))
        plan = gsa.plan(requests)
        return {layer: gsa.run(plan, layer, *token_batch(workload, requests, positions, layer))
                for layer in range(shape.layers)}

    times, outputs = decode(workload, steps, step_fn)
    measured = {k: v - snapshot.get(k, 0) if isinstance(v, int) and k != "piece_bytes" else v
                for k, v in vars(gsa.stats).items()}
    peak = gsa.prefetcher.peak_in_flight if gsa.prefetcher is not None else 0
    gsa.close()
    return times, outputs, measured, peak


def compare(outputs: list[dict], expected: list[dict]) -> dict:
    """Bit-for-bit equality and the largest relative L2 error over every step and layer."""
    exact, worst = True, 0.0
    for got_step, want_step in zip(outputs, expected):
        for layer, want in want_step.items():
            got = got_step[layer]
            exact = exact and torch.equal(got, want)
            worst = max(worst, ((got.float() - want.float()).norm() / want.float().norm()).item())
    return {"bitwise_equal": exact, "max_rel_error": round(worst, 6)}


def selection_pieces(shape: Shape, batch: int) -> int:
    """Pieces one step's selection of ``batch`` requests needs at the end of the run."""
    return batch * NUM_KV_HEADS * num_selected(shape.table_blocks, CONFIG, BLOCK)


def bench_schedule(name: str, workload: Workload, cache: PagedKV, pool, h2d_gbps: float | None) -> list[dict]:
    shape = workload.shape
    steps = schedule(shape, name)
    per_step = len(steps[0])
    tag = f"b{per_step}_ctx{shape.context}_L{shape.layers}_{name}"
    dense_ms, dense_out = run_on_device(workload, cache, steps, sparse=False)
    gsa_ms, gsa_out = run_on_device(workload, cache, steps, sparse=True)
    dense_median = statistics.median(dense_ms[shape.warmup:])
    gsa_median = statistics.median(gsa_ms[shape.warmup:])

    def tokens_per_s(ms: float) -> float:
        return round(per_step / (ms * 1e-3), 1)

    rows = [row("decode_step", "dense_on_device", tag, dense_median, tokens_per_s=tokens_per_s(dense_median)),
            row("decode_step", "gsa_on_device", tag, gsa_median, baseline_ms=dense_median,
                tokens_per_s=tokens_per_s(gsa_median), **{f"vs_dense_{k}": v for k, v in
                                                           compare(gsa_out, dense_out).items()})]
    budget = int(BUDGET_SLACK * selection_pieces(shape, per_step) / NUM_KV_HEADS) + shape.batch
    for ahead in (0, CONFIG.prefetch_ahead):
        times, outputs, stats, peak = run_offload(workload, steps, budget, ahead, pool)
        check = compare(outputs, gsa_out)
        if check["max_rel_error"] > MAX_REL_ERROR:
            raise AssertionError(f"{tag} offload (prefetch_ahead={ahead}) differs from on-device GSA: {check}")
        median = statistics.median(times[shape.warmup:])
        tokens = stats["tokens"]
        pcie = (stats["h2d_bytes"] + stats["d2h_bytes"]) / tokens if tokens else 0.0
        floor = ({"h2d_floor_ms_per_step": round(stats["h2d_bytes"] / (h2d_gbps * 1e6) / shape.steps, 4)}
                 if h2d_gbps else {})
        rows.append(row("decode_step", f"gsa_offload_prefetch_{'on' if ahead else 'off'}", tag, median,
                        baseline_ms=dense_median, tokens_per_s=tokens_per_s(median),
                        vs_gsa_on_device=round(gsa_median / median, 3), gpu_budget_blocks=budget,
                        prefetch_ahead=ahead, max_pending_prefetch=CONFIG.max_pending_prefetch,
                        peak_pieces_in_flight=peak, piece_bytes=stats["piece_bytes"],
                        hit_rate=round(1 - stats["sync_misses"] / stats["needed"], 4),
                        pcie_bytes_per_token=round(pcie), **floor,
                        sync_misses_per_step=round(stats["sync_misses"] / shape.steps, 1),
                        prefetched_per_step=round(stats["prefetched"] / shape.steps, 1),
                        prefetch_cancelled_per_step=round(stats["prefetch_cancelled"] / shape.steps, 1),
                        needed_per_step=round(stats["needed"] / shape.steps, 1),
                        **{f"vs_gsa_{k}": v for k, v in check.items()}))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'impl':<26}{'shape':<34}{'ms/step':>9}{'tok/s':>9}{'x dense':>8}{'hit':>7}{'PCIe B/tok':>12}"
          f"{'miss/step':>10}")
    for r in rows:
        print(f"{r['impl']:<26}{r['shape']:<34}{r['median_ms']:>9.3f}{r['tokens_per_s']:>9.1f}"
              f"{r.get('speedup_vs_baseline', 1.0):>8.2f}{r.get('hit_rate', float('nan')):>7.3f}"
              f"{r.get('pcie_bytes_per_token', 0):>12}{r.get('sync_misses_per_step', 0):>10}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (any device) to check the script")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    shape = Shape(batch=4, context=4096 - 64, layers=2, warmup=2, steps=4) if args.smoke else Shape()
    ceilings = measure_copy_ceilings() if device.type == "cuda" else {}
    host_bytes = shape.batch * shape.table_blocks * NUM_KV_HEADS * 2 * BLOCK * HEAD_DIM * DTYPE.itemsize
    pool = PinnedMemoryPool(pinned_pool_size=host_bytes, max_pinned_size=shape.layers * host_bytes + (1 << 20),
                            pinned=device.type == "cuda")
    workload = Workload(shape, device)
    workload.build_streams()
    cache = PagedKV(workload)
    rows = []
    for name in ("steady", "alternating"):
        rows += bench_schedule(name, workload, cache, pool, ceilings.get("h2d_pinned_gbps"))
    path = write_results("gsa_offload", rows, ceilings, extra={"config": asdict(CONFIG), "shape": asdict(shape),
                                                               "budget_slack": BUDGET_SLACK,
                                                               "query_drift": QUERY_DRIFT})
    print_table(rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
