"""GSA offload mode on the GPU: decode tokens/s at 128K context x batch 8 against on-device dense and on-device GSA,
hot-piece hit rate, PCIe bytes per token against the H2D floor, prefetch on against off; and (``--long``) one
512K-token request with at most 10% of its KV on the GPU against on-device GSA at 128K.

One run, Llama-like layer geometry (32 query / 8 KV heads, head_dim 128, block 16, bf16), ``--layers`` layers, 8
requests with CONTEXT-token prompts. Keys come in topic chunks (a chunk's keys share a direction, plus noise) and each
request's decode queries drift a little per step around a few topics, so consecutive selections overlap as in real
decoding. GSA: sparse_ratio 0.3, windows init 1 / local 4, min 8 blocks, Quest; a piece is one (block, KV head).

Schedules (the same token streams per request in every mode):
* ``steady``: the 8 requests decode every step; hot budget 1.25x one step's selection.
* ``alternating``: requests 0-3 and 4-7 take turns (4 per step); hot budget 1.25x one group's selection, so a
  group's pieces are evicted while the other runs and come back by prefetch (prefetch_ahead 2) or as misses.

Prefetch admits every predicted piece (GSAConfig's max_pending_prefetch counts requests since 2026-12-06, its
default 128 covers the batch; before, it counted blocks a layer and the runs here set 65536): capped at 4096 blocks a
layer it left a third of the taking-turns misses to the step and ran 0.2% slower than prefetch off; uncapped, 0.5%
faster (H100, f6fe426, BENCHMARKS.md).

``--long``: 32 layers, one request of 512K tokens, a 2048-token budget per step (the ratio 0.3 would need 30% of the
KV per step), a GPU budget of 10% of the request's pieces per layer; on-device GSA at 512K (it fits on an H200) is
the correctness reference, on-device GSA at 128K x 1 over 32 layers the speed reference.

Modes: ``dense`` (our dense_decode kernel over the paged cache), ``gsa`` (on-device GSA), ``offload`` with prefetch off
(prefetch_ahead 0) and on. Correctness first, on the same steps that are timed: every offload output is compared
with on-device GSA's (bit-for-bit equality reported, closeness required) and GSA's error against dense reported.
Times: wall clock per decode step (all layers, token writes included), median over STEPS after WARMUP, synchronized.
The pinned H2D ceiling is measured in the same run.

Usage, from the repo root on the GPU: ``python -m bench.bench_gsa_offload [--layers N] [--long]`` (JSON under $OUT
or bench/results/); ``--smoke`` runs tiny shapes (CPU works) to check the script.
"""
import argparse
import collections
import cProfile
import io
import itertools
import os
import pstats
import statistics
import time
import weakref
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
                   prefetch_workers=4, prefetch_ahead=2, offload=True)
LONG_CONFIG = replace(CONFIG, token_budget=2048)
LONG_GPU_SHARE = 0.1  # of the long request's pieces, per layer
BUDGET_SLACK = 1.25  # hot budget / one step's selection
QUERY_DRIFT = 0.05  # per-step drift of a decode query, relative to its norm
MAX_REL_ERROR = 2e-2  # offload against on-device GSA: they should be equal; closeness is required


@dataclass(frozen=True)
class Shape:
    batch: int = 8
    context: int = 131072 - 64  # prompt tokens: prompt + decode fit 8192 blocks (the host KV is 4 GiB per layer)
    layers: int = 2
    warmup: int = 5
    steps: int = 40

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


def token_batch(workload: Workload, requests: list[int], positions: list[int], layer: int):
    """q ``[b, NUM_Q_HEADS, HEAD_DIM]``, k and v ``[b, NUM_KV_HEADS, HEAD_DIM]`` of each request's next token."""
    return tuple(torch.stack([streams[r, layer][i] for r, i in zip(requests, positions)])
                 for streams in (workload.queries, workload.keys, workload.values))


class OnDevice:
    """Dense attention (our kernel) or on-device GSA over the paged cache, one decode step at a time (modes that
    share the cache write the same tokens into it)."""

    def __init__(self, workload: Workload, cache: PagedKV, sparse: bool, config: GSAConfig = CONFIG):
        self.workload, self.cache, self.sparse = workload, cache, sparse
        self.gsa = GSA(replace(config, offload=False), block_size=BLOCK)

    def step(self, requests: list[int], positions: list[int]) -> dict:
        shape, cache = self.workload.shape, self.cache
        lens = torch.tensor([shape.context + i + 1 for i in positions], dtype=torch.int32, device=self.workload.device)
        table = cache.table[requests]
        plan = self.gsa.plan(requests, lens, table) if self.sparse else None
        out = {}
        for layer in range(shape.layers):
            q, k, v = token_batch(self.workload, requests, positions, layer)
            cache.write_tokens(layer, table, lens - 1, k, v)
            if self.sparse:
                out[layer] = self.gsa.run(plan, layer, q, cache.kv[layer][0], cache.kv[layer][1])
            else:
                out[layer] = attend(resolve_backend("auto", q), q, cache.kv[layer][0], cache.kv[layer][1], table,
                                    lens, None, None)
        return out


class Offloaded:
    """OffloadedGSA with every prompt written to its host KV; ``spent`` collects host seconds per part of a step
    (:func:`_time_parts`) from :meth:`warm` on."""

    def __init__(self, workload: Workload, config: GSAConfig, pool, spent: collections.Counter | None = None):
        shape = workload.shape
        self.workload, self.config, self.spent = workload, config, spent
        self.gsa = OffloadedGSA(config, num_layers=shape.layers, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                                block_size=BLOCK, host_blocks=shape.batch * shape.table_blocks, dtype=DTYPE,
                                device=workload.device, cache=CacheTier(shape.layers, pool))
        if spent is not None:
            _time_parts(self.gsa, spent)
        for request in range(shape.batch):
            for layer in range(shape.layers):
                keys, values, _ = workload.prompt(request, layer)
                self.gsa.write_prompt(request, layer, keys, values)
        self.snapshot = {}

    def warm(self) -> None:
        """The timed steps start: counters and host times from here on."""
        self.snapshot = dict(vars(self.gsa.stats))
        if self.spent is not None:
            self.spent.clear()

    def step(self, requests: list[int], positions: list[int]) -> dict:
        plan = self.gsa.plan(requests)
        return {layer: self.gsa.run(plan, layer, *token_batch(self.workload, requests, positions, layer))
                for layer in range(self.workload.shape.layers)}

    def close(self) -> dict:
        """Release the host KV; the counters of the timed steps."""
        measured = {k: v - self.snapshot.get(k, 0) if isinstance(v, int) and k != "piece_bytes" else v
                    for k, v in vars(self.gsa.stats).items()}
        self.gsa.close()
        return measured


def lockstep(workload: Workload, steps: list[list[int]], modes: dict) -> dict:
    """Run every mode's decode steps in turn, step by step (so that each step of each mode is timed under the same
    machine conditions: host-bound eager decoding varies between minutes), the mode that goes first rotating from
    step to step (so none always follows the same one); ``{name: (ms per step, outputs)}``."""
    done = {r: 0 for r in range(workload.shape.batch)}
    results = {name: ([], []) for name in modes}
    names = list(modes)
    for step, requests in enumerate(steps):
        if step == workload.shape.warmup:
            for mode in modes.values():
                if hasattr(mode, "warm"):
                    mode.warm()
        positions = [done[r] for r in requests]
        for name in names[step % len(names):] + names[:step % len(names)]:
            mode = modes[name]
            sync(workload.device)
            start = time.perf_counter()
            out = mode.step(requests, positions)
            sync(workload.device)
            results[name][0].append((time.perf_counter() - start) * 1e3)
            results[name][1].append(out)
        for r in requests:
            done[r] += 1
    return results


def compare(outputs: list[dict], expected: list[dict]) -> dict:
    """Bit-for-bit equality and the largest relative L2 error over every step and layer."""
    exact, worst = True, 0.0
    for got_step, want_step in zip(outputs, expected):
        for layer, want in want_step.items():
            got = got_step[layer]
            exact = exact and torch.equal(got, want)
            worst = max(worst, ((got.float() - want.float()).norm() / want.float().norm()).item())
    return {"bitwise_equal": exact, "max_rel_error": round(worst, 6)}


def selection_pieces(shape: Shape, batch: int, config: GSAConfig = CONFIG) -> int:
    """Pieces one step's selection of ``batch`` requests needs at the end of the run."""
    return batch * NUM_KV_HEADS * num_selected(shape.table_blocks, config, BLOCK)


def offload_config(shape: Shape, per_step: int, **fields) -> GSAConfig:
    """CONFIG with a hot budget of BUDGET_SLACK x one step's selection of ``per_step`` requests (plus their newest
    blocks) and GSAConfig ``fields`` (prefetch_ahead, ...)."""
    budget = int(BUDGET_SLACK * selection_pieces(shape, per_step) / NUM_KV_HEADS) + shape.batch
    return replace(CONFIG, gpu_budget_blocks=budget, **fields)


def prefetch_variants(settings: list[tuple[int, int]]) -> dict[str, dict]:
    """Offload modes to run: prefetch off, prefetch on with CONFIG's copy settings, and prefetch on with each
    (prefetch_workers, max_pending_prefetch) of ``settings``; ``{mode name: GSAConfig fields}``."""
    variants = {"gsa_offload_prefetch_off": {"prefetch_ahead": 0},
                "gsa_offload_prefetch_on": {"prefetch_ahead": CONFIG.prefetch_ahead}}
    for workers, pending in settings:
        variants[f"gsa_offload_prefetch_on_w{workers}_p{pending}"] = {
            "prefetch_ahead": CONFIG.prefetch_ahead, "prefetch_workers": workers, "max_pending_prefetch": pending}
    return variants


def bench_schedule(name: str, workload: Workload, cache: PagedKV, pool, h2d_gbps: float | None,
                   variants: dict[str, dict], select_every: int = 1) -> list[dict]:
    """Dense, on-device GSA and the offload ``variants`` (:func:`prefetch_variants`), in lock-step over one
    schedule; both GSA modes reuse selections for ``select_every`` steps."""
    shape = workload.shape
    steps = schedule(shape, name)
    per_step = len(steps[0])
    tag = f"b{per_step}_ctx{shape.context}_L{shape.layers}_{name}"
    offloads = {mode: Offloaded(workload, offload_config(shape, per_step, select_every=select_every, **fields), pool,
                                collections.Counter()) for mode, fields in variants.items()}
    modes = {"dense_on_device": OnDevice(workload, cache, sparse=False),
             "gsa_on_device": OnDevice(workload, cache, True, replace(CONFIG, select_every=select_every)), **offloads}
    results = lockstep(workload, steps, modes)
    median = {mode: statistics.median(times[shape.warmup:]) for mode, (times, _) in results.items()}
    dense_out, gsa_out = results["dense_on_device"][1], results["gsa_on_device"][1]
    rows = [row("decode_step", "dense_on_device", tag, median["dense_on_device"],
                tokens_per_s=round(per_step / (median["dense_on_device"] * 1e-3), 1)),
            row("decode_step", "gsa_on_device", tag, median["gsa_on_device"], baseline_ms=median["dense_on_device"],
                tokens_per_s=round(per_step / (median["gsa_on_device"] * 1e-3), 1),
                **{f"vs_dense_{k}": v for k, v in compare(gsa_out, dense_out).items()})]
    off_times = results["gsa_offload_prefetch_off"][0][shape.warmup:]
    for mode, offload in offloads.items():
        rows.append(offload_row(mode, offload, results[mode], gsa_out, tag, median["dense_on_device"],
                                median["gsa_on_device"], h2d_gbps))
        if mode != "gsa_offload_prefetch_off":  # per step against prefetch off's same step: drift cancels
            rows[-1]["vs_prefetch_off_paired"] = round(statistics.median(
                off / on for off, on in zip(off_times, results[mode][0][shape.warmup:])), 4)
    return rows


def offload_row(mode: str, offload: Offloaded, result: tuple, expected: list[dict], tag: str, baseline_ms: float,
                gsa_ms: float, h2d_gbps: float | None) -> dict:
    """Check an offload mode's outputs against on-device GSA's, release it, one results row."""
    times, outputs = result
    shape, config = offload.workload.shape, offload.config
    per_step = len(outputs[0][0])
    stats = offload.close()
    check = compare(outputs, expected)
    if check["max_rel_error"] > MAX_REL_ERROR:
        raise AssertionError(f"{tag} {mode} differs from on-device GSA: {check}")
    median = statistics.median(times[shape.warmup:])
    pcie = (stats["h2d_bytes"] + stats["d2h_bytes"]) / stats["tokens"] if stats["tokens"] else 0.0
    floor_ms = stats["h2d_bytes"] / (h2d_gbps * 1e6) / shape.steps if h2d_gbps else None
    floor = {"h2d_floor_ms_per_step": round(floor_ms, 4), "x_h2d_floor": round(median / floor_ms, 2)} \
        if floor_ms else {}
    return row("decode_step", mode, tag, median, baseline_ms=baseline_ms,
               tokens_per_s=round(per_step / (median * 1e-3), 1), vs_gsa_on_device=round(gsa_ms / median, 3),
               gpu_budget_blocks=config.gpu_budget_blocks, prefetch_ahead=config.prefetch_ahead,
               max_pending_prefetch=config.max_pending_prefetch, select_every=config.select_every,
               piece_bytes=stats["piece_bytes"],
               hit_rate=round(1 - stats["sync_misses"] / stats["needed"], 4), pcie_bytes_per_token=round(pcie),
               **floor, h2d_mb_per_step=round(stats["h2d_bytes"] / shape.steps / 1e6, 2),
               sync_misses_per_step=round(stats["sync_misses"] / shape.steps, 1),
               prefetched_per_step=round(stats["prefetched"] / shape.steps, 1),
               needed_per_step=round(stats["needed"] / shape.steps, 1),
               host_ms_per_step={name: round(1e3 * total / shape.steps, 3)
                                 for name, total in offload.spent.most_common()},
               **{f"vs_gsa_{k}": v for k, v in check.items()})


def bench_long(shape: Shape, reference: Shape, pool, h2d_gbps: float | None, select_every: int = 1) -> list[dict]:
    """One long request offloaded with LONG_GPU_SHARE of its pieces on the GPU, in lock-step with on-device GSA at
    the same length (the outputs' reference) and at ``reference``'s shorter length (the speed reference); prefetch
    off and on in turn (the host holds one offloaded copy of the KV at a time); every GSA reuses selections for
    ``select_every`` steps."""
    long_config = replace(LONG_CONFIG, select_every=select_every)
    workload, short = Workload(shape, _device()), Workload(reference, _device())
    workload.build_streams()
    short.build_streams()
    steps = schedule(shape, "steady")
    tag = f"b1_ctx{shape.context}_L{shape.layers}_long"
    cache, short_cache = PagedKV(workload), PagedKV(short)
    budget = int(LONG_GPU_SHARE * shape.table_blocks)
    rows = []
    for ahead in (0, long_config.prefetch_ahead):
        config = replace(long_config, gpu_budget_blocks=budget, prefetch_ahead=ahead)
        mode = f"gsa_offload_prefetch_{'on' if ahead else 'off'}"
        offload = Offloaded(workload, config, pool, collections.Counter())
        results = lockstep(workload, steps, {"long": OnDevice(workload, cache, True, long_config),
                                             "reference": OnDevice(short, short_cache, True, long_config),
                                             mode: offload})
        long_ms, short_ms = (statistics.median(results[m][0][shape.warmup:]) for m in ("long", "reference"))
        rows += [row("decode_step", "gsa_on_device", f"b1_ctx{reference.context}_L{reference.layers}_reference",
                     short_ms, tokens_per_s=round(1 / (short_ms * 1e-3), 1), paired_with=mode),
                 row("decode_step", "gsa_on_device", tag, long_ms, tokens_per_s=round(1 / (long_ms * 1e-3), 1),
                     paired_with=mode)]
        result = offload_row(mode, offload, results[mode], results["long"][1], tag, short_ms, short_ms, h2d_gbps)
        result["gpu_share_of_kv"] = round(budget / shape.table_blocks, 4)
        result["vs_gsa_on_device_at_reference"] = result.pop("vs_gsa_on_device")
        result["vs_gsa_on_device_same_length"] = round(long_ms / result["median_ms"], 3)
        rows.append(result)
    return rows


def profile_offload(workload: Workload, pool, out_dir: str) -> None:
    """Steady schedule, on-device GSA and the offload mode (prefetch off) in lock-step: each mode's host time by
    Python function (cProfile) over the timed steps, side by side in ``out_dir``/gsa_offload_profile.txt."""
    shape = workload.shape
    offload = Offloaded(workload, offload_config(shape, shape.batch, prefetch_ahead=0), pool)
    modes = {"gsa_on_device": _Profiled(OnDevice(workload, PagedKV(workload), sparse=True), shape.warmup),
             "gsa_offload_prefetch_off": _Profiled(offload, shape.warmup)}
    results = lockstep(workload, schedule(shape, "steady"), modes)
    offload.close()
    text = []
    for name, mode in modes.items():
        median = statistics.median(results[name][0][shape.warmup:])
        for order in ("tottime", "cumulative"):
            report = io.StringIO()
            pstats.Stats(mode.profile, stream=report).sort_stats(order).print_stats(30)
            text += [f"== {name}: {median:.3f} ms a step (median, under cProfile); {shape.steps} steps by {order}",
                     report.getvalue()]
    path = os.path.join(out_dir, "gsa_offload_profile.txt")
    with open(path, "w") as handle:
        handle.write("\n".join(text))
    print(f"wrote {path}")


def profile_gpu(workload: Workload, pool, out_dir: str, schedules: list[str], steps: int = 6) -> None:
    """Per schedule, on-device GSA and the offload mode (prefetch off) each alone: the device time of every kernel
    over ``steps`` steps after the warm-up (torch.profiler), per schedule and mode in
    ``out_dir``/gsa_offload_gpu_profile.txt."""
    shape = workload.shape
    text = []
    for schedule_name, name in itertools.product(schedules, ("gsa_on_device", "gsa_offload_prefetch_off")):
        plan = schedule(shape, schedule_name)[:shape.warmup + steps]
        per_step = len(plan[0])  # as bench_schedule sizes the GPU budget
        mode = (OnDevice(workload, PagedKV(workload), sparse=True) if name == "gsa_on_device" else
                Offloaded(workload, offload_config(shape, per_step, prefetch_ahead=0), pool))
        lockstep(workload, plan[:shape.warmup], {name: mode})
        activities = [torch.profiler.ProfilerActivity.CPU]
        if workload.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profile:
            for step, requests in enumerate(plan[shape.warmup:]):
                mode.step(requests, [shape.warmup + step] * len(requests))
            sync(workload.device)
        order = "cuda_time_total" if workload.device.type == "cuda" else "cpu_time_total"
        table = profile.key_averages().table(sort_by=order, row_limit=25, max_name_column_width=60)
        text += [f"== {name}: {steps} {schedule_name} steps of {shape.layers} layers, device time by kernel", table]
        if hasattr(mode, "close"):
            mode.close()
        del mode
    path = os.path.join(out_dir, "gsa_offload_gpu_profile.txt")
    with open(path, "w") as handle:
        handle.write("\n".join(text))
    print("\n".join(text))
    print(f"wrote {path}")


class _Profiled:
    """A mode whose steps after the first ``warmup`` run under its own cProfile profile."""

    def __init__(self, mode, warmup: int):
        self.mode, self.warmup, self.calls, self.profile = mode, warmup, 0, cProfile.Profile()

    def step(self, requests: list[int], positions: list[int]) -> dict:
        self.calls += 1
        if self.calls <= self.warmup:
            return self.mode.step(requests, positions)
        self.profile.enable()
        try:
            return self.mode.step(requests, positions)
        finally:
            self.profile.disable()


def _time_parts(gsa: OffloadedGSA, spent: collections.Counter) -> None:
    """Wrap the parts of a decode step of ``gsa`` so that their host time adds up in ``spent`` (seconds). The
    wrappers hold their methods weakly: an instance attribute holding its own bound method would make ``gsa`` (and
    its device pools) a reference cycle, alive until the garbage collector runs."""
    def timed(name, method):
        method = weakref.WeakMethod(method)

        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method()(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return call

    for name in ("plan", "run", "_write_token", "_complete_filled", "_select", "_resident", "_attend", "_remember"):
        setattr(gsa, name, timed(name, getattr(gsa, name)))
    for pool in gsa.pools:
        for name in ("admit", "admit_selection", "fetch"):
            setattr(pool, name, timed(f"pool.{name}", getattr(pool, name)))


def print_table(rows: list[dict]) -> None:
    print(f"{'impl':<38}{'shape':<34}{'ms/step':>9}{'tok/s':>9}{'x dense':>8}{'hit':>7}{'PCIe B/tok':>12}"
          f"{'miss/step':>10}{'x off':>8}")
    for r in rows:
        print(f"{r['impl']:<38}{r['shape']:<34}{r['median_ms']:>9.3f}{r['tokens_per_s']:>9.1f}"
              f"{r.get('speedup_vs_baseline', 1.0):>8.2f}{r.get('hit_rate', float('nan')):>7.3f}"
              f"{r.get('pcie_bytes_per_token', 0):>12}{r.get('sync_misses_per_step', 0):>10}"
              f"{r.get('vs_prefetch_off_paired', float('nan')):>8.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (any device) to check the script")
    parser.add_argument("--layers", type=int, default=8, help="layers of the batch-8 schedules (default 8)")
    parser.add_argument("--long", action="store_true", help="also the 512K x 1 run over 32 layers")
    parser.add_argument("--schedules", nargs="+", choices=("steady", "alternating"), default=["steady", "alternating"],
                        help="the batch-8 schedules to run (default both)")
    parser.add_argument("--profile", action="store_true", help="only profile the host side of the steady steps")
    parser.add_argument("--gpu-profile", action="store_true",
                        help="only the device time by kernel of each schedule's steps")
    parser.add_argument("--prefetch-settings", nargs="+", type=_workers_pending, default=[], metavar="W:P",
                        help="also run prefetch on with prefetch_workers W and max_pending_prefetch P (each "
                             "pair one more offload mode in the lock-step, with a host KV of its own)")
    parser.add_argument("--select-every", type=int, default=1, metavar="N",
                        help="GSAConfig.select_every of every GSA mode, on-device and offloaded (default 1)")
    args = parser.parse_args(argv)
    device = _device()
    if args.smoke:
        shape, long_shape, reference = (Shape(batch=4, context=4096 - 64, layers=2, warmup=2, steps=4),
                                        Shape(batch=1, context=32768 - 64, layers=2, warmup=2, steps=4),
                                        Shape(batch=1, context=2048 - 64, layers=2, warmup=2, steps=4))
    else:
        shape, long_shape, reference = (Shape(layers=args.layers), Shape(batch=1, context=524288 - 64, layers=32),
                                        Shape(batch=1, layers=32))
    ceilings = measure_copy_ceilings() if device.type == "cuda" else {}
    h2d = ceilings.get("h2d_pinned_gbps")
    rows = []
    extra = {"config": asdict(CONFIG), "long_config": asdict(LONG_CONFIG), "shape": asdict(shape),
             "long_shape": asdict(long_shape) if args.long else None, "budget_slack": BUDGET_SLACK,
             "long_gpu_share": LONG_GPU_SHARE, "query_drift": QUERY_DRIFT, "select_every": args.select_every}
    if args.layers:
        variants = prefetch_variants(args.prefetch_settings)
        pool = host_pool(shape, device, copies=len(variants))  # the offload modes run side by side
        workload = Workload(shape, device)
        workload.build_streams()
        if args.gpu_profile:
            profile_gpu(workload, pool, os.environ.get("OUT", "bench/results"), args.schedules)
            return
        if args.profile:
            profile_offload(workload, pool, os.environ.get("OUT", "bench/results"))
            return
        cache = PagedKV(workload)
        for name in args.schedules:
            rows += bench_schedule(name, workload, cache, pool, h2d, variants, args.select_every)
            write_results("gsa_offload", rows, ceilings, extra)  # what is done survives a run cut short
        del cache, workload, pool  # the schedules' pinned host KV (34 GB per offload mode at 8 layers) goes back
        # before the long run's 69 GB
    if args.long:
        rows += bench_long(long_shape, reference, host_pool(long_shape, device, copies=1), h2d, args.select_every)
    path = write_results("gsa_offload", rows, ceilings, extra)
    print_table(rows)
    print(f"wrote {path}")


def _workers_pending(text: str) -> tuple[int, int]:
    """``W:P`` -> (prefetch_workers W, max_pending_prefetch P), both ints >= 1."""
    try:
        workers, pending = (int(part) for part in text.split(":"))
    except ValueError:
        workers = pending = 0
    if workers < 1 or pending < 1:
        raise argparse.ArgumentTypeError(f"--prefetch-settings: got {text!r}, expected W:P with ints W, P >= 1")
    return workers, pending


def host_pool(shape: Shape, device: torch.device, copies: int) -> PinnedMemoryPool:
    """A pool for ``copies`` host KVs of ``shape`` (every layer), pinned on a GPU machine."""
    host_bytes = shape.batch * shape.table_blocks * NUM_KV_HEADS * 2 * BLOCK * HEAD_DIM * DTYPE.itemsize
    return PinnedMemoryPool(pinned_pool_size=host_bytes,
                            max_pinned_size=copies * shape.layers * host_bytes + (1 << 20),
                            pinned=device.type == "cuda")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


if __name__ == "__main__":
    main()
