"""Where one layer's GSA decode time goes on the GPU: device time by kernel against the CUDA-graph replay's time.

For each shape (1 and 8 requests x 128K, 1 x 128K + 96 tokens, 32 x 32K) and selection (sparse_ratio 0.3, 2048-token
budget; Quest on bf16 reprs), the layer's select + attend, its reuse step (the selection launched with no row to
reselect, then attention), the selection and the attention alone, and our dense decode are captured in CUDA graphs
(``bench_sparse_decode``'s inputs and plans). Per graph: the replay's median (``do_bench``, L2 cleared before every
replay) and, from torch.profiler over REPLAYS replays (L2 cleared between them too), each kernel's device time per
replay; the replay time minus the summed kernel times is what the graph spends between and around its kernels.
Variants, replay times only, each checked against the first: the selection at each score tile of SCORE_TILES; the
top-k launch alone at each warp count of WARPS (same lists as the planned warps), to tell a program that is
issue-bound (time flat in warps) from one that waits on its reductions' barriers (time grows with warps).

Usage, on the GPU: ``python -m bench.profile_gsa_kernels`` (JSON under $OUT or bench/results/).
"""
import dataclasses

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from bench.bench_sparse_decode import SELECTIONS, attend, build_case, graph_of, layer_steps, rule_reprs, select
from bench.harness import run_shapes
from ucm_kernels.block_select.triton import _launch_select

SHAPES = ((1, 131072), (1, 131168), (8, 131072), (32, 32768))  # 131168 tokens: an 8198-block table
REPLAYS = 20
WARPS = (2, 4, 8, 16, 32)
SCORE_TILES = (2, 4, 8, 16)
FLUSH = 256 << 20  # bytes written between replays so nothing stays in L2 (do_bench clears as much)


def kernel_times(graph: torch.cuda.CUDAGraph) -> dict:
    """{kernel: device microseconds per replay} over REPLAYS replays, the L2 flush between them left out."""
    flush = torch.empty(FLUSH, dtype=torch.int8, device="cuda")
    prof = profile(activities=[ProfilerActivity.CUDA])
    with prof:
        for _ in range(REPLAYS):
            flush.zero_()
            graph.replay()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0 and "elementwise" not in event.key and "fill" not in event.key:
            times[event.key[:60]] = round(event.self_device_time_total / REPLAYS, 2)
    return times


def graph_row(name: str, shape: str, fn) -> dict:
    graph = graph_of(fn)
    replay_us = do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3
    kernels = kernel_times(graph)
    row = {"name": name, "shape": shape, "replay_us": round(replay_us, 2), "kernels_us": kernels,
           "outside_kernels_us": round(replay_us - sum(kernels.values()), 2)}
    print(row, flush=True)
    return row


def warp_rows(case, selection: str, shape: str) -> list[dict]:
    """The top-k launch alone, over the scores of one selection, at each warp count (lists checked equal)."""
    plan = case.select_plans[selection, "quest"]
    expected = select(case, selection, "quest")
    rows = []
    for warps in WARPS:
        variant = dataclasses.replace(plan, select_warps=warps)
        sel_idx, sel_count = torch.full_like(expected[0], -2), torch.zeros_like(expected[1])
        launch = lambda: _launch_select(variant, variant.scores, case.seq_lens, sel_idx, sel_count, None, None)  # noqa: E731
        launch()
        if not (torch.equal(sel_idx, expected[0]) and torch.equal(sel_count, expected[1])):
            raise AssertionError(f"{shape} {selection}: top-k at {warps} warps differs from the planned launch")
        graph = graph_of(launch)
        us = do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3
        rows.append({"name": f"topk_{selection}", "shape": shape, "select_warps": warps,
                     "planned": warps == plan.select_warps, "replay_us": round(us, 2)})
        print(rows[-1], flush=True)
    return rows


def variant_rows(name: str, shape: str, run, plans: dict) -> list[dict]:
    """``run(plan)`` under each of ``plans`` ({label: plan}), replay times only, outputs checked against the
    first's (the same lists: block indices within 2e-2)."""
    rows, first = [], None
    for label, plan in plans.items():
        out = run(plan).clone()
        if first is None:
            first = out
        torch.testing.assert_close(out.float(), first.float(), atol=2e-2, rtol=0)
        graph = graph_of(lambda: run(plan))
        us = do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3
        rows.append({"name": name, "shape": shape, "variant": label, "replay_us": round(us, 2)})
        print(rows[-1], flush=True)
    return rows


def shape_rows(batch: int, context: int) -> list[dict]:
    case = build_case(batch, context)
    out = torch.empty_like(case.q)
    rows = [graph_row(name, case.shape, step) for name, step in layer_steps(case, out).items()]
    for selection in SELECTIONS:
        rows.append(graph_row(f"select_{selection}", case.shape, lambda: select(case, selection, "quest")))
        lists = select(case, selection, "quest")
        rows.append(graph_row(f"attend_{selection}", case.shape, lambda: attend(case, selection, *lists, out)))
        plan = case.select_plans[selection, "quest"]
        reprs = rule_reprs(case, "quest")
        rows += variant_rows(f"select_{selection}", case.shape, lambda tiled: tiled.run(
            case.q, block_table=case.block_table, seq_lens=case.seq_lens, **reprs)[0].float(),
            {f"score_tile_{tile}": dataclasses.replace(plan, score_tile=tile) for tile in SCORE_TILES})
        rows += warp_rows(case, selection, case.shape)
    return rows


def main() -> None:
    run_shapes("gsa_kernel_profile", SHAPES, shape_rows, extra={"replays": REPLAYS})


if __name__ == "__main__":
    main()
