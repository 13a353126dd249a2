"""The score kernel's launch: a program a tile against programs looping over tiles with summaries loaded ahead.

``SelectPlan.run`` scores every competing block of a request before its top-k; at 1 x 128K the kernel read its
33.5 MB of bf16 summaries at about 2.3 TB/s on the H200 (14.5 us, BENCHMARKS.md) where the batch of 8 streams at
the copy ceiling: a program a tile (1024 programs, under three waves) pays a chain of dependent loads (length, table,
summaries) per tile. Here the selection is planned as ``plan_select`` plans it, then replayed with the score launch
varied (``score_programs`` a request, ``score_stages`` of Triton's loop pipelining): a program a tile (the launch
before 2026-12-07), and 1 to 4 programs an SM at 2 to 4 stages. Lists must be equal bit for bit to the planned
launch's before anything is timed. Shapes: 1 x 128K, 8 x 128K, 32 x 32K (32 query / 8 KV heads of 128, blocks of 16,
sparse_ratio 0.3), Quest over bf16 and fp8 summaries. Timed (do_bench median, L2 cleared before every call,
CUDA-graph replay): the selection, and the score kernel's device time (torch.profiler); bytes are the summaries read.

    python -m bench.score_ab     # JSON under $OUT or bench/results/
"""
import dataclasses

import torch

from bench.bench_sparse_decode import HEAD_DIM, NUM_KV_HEADS, graph_of, median_ms
from bench.harness import measure_copy_ceilings, row, write_results
from bench.profile_gsa_kernels import kernel_times
from bench.sliced_topk_ab import inputs
from bench.sliced_topk_ab import SIZES as BUDGET_SIZES
from ucm_kernels._utils import cdiv, sm_count
from ucm_kernels.block_select import plan_select

SIZES = {**BUDGET_SIZES, "token_budget": None}  # sparse_ratio 0.3, windows 1 + 4, at least 8 blocks
SHAPES = ((1, 131072), (8, 131072), (32, 32768))  # batch, context
PER_SM_STAGES = ((2, 3), (1, 3), (3, 3), (4, 2), (2, 2), (2, 4))  # programs an SM, stages (the planned first)


def variants(plan) -> dict:
    """{name: plan} of the score launches timed: the planned one, a program a tile, and PER_SM_STAGES."""
    tiles = cdiv(plan.max_blocks, plan.score_tile)
    sms = sm_count(plan.scores.device)
    out = {"planned": plan,
           "program_a_tile": dataclasses.replace(plan, score_programs=tiles * plan.batch, score_stages=1)}
    for per_sm, stages in PER_SM_STAGES:
        out[f"per_sm{per_sm}_stages{stages}"] = dataclasses.replace(plan, score_programs=sms * per_sm,
                                                                    score_stages=stages)
    return out


def summary_bytes(case: dict, rule: str) -> int:
    """Bytes of the summaries the Quest score reads: kmin and kmax of every block (and fp8's scales)."""
    reprs = case["reprs"][rule]
    per_block = sum(reprs[name][0].numel() * reprs[name].element_size() for name in ("kmin", "kmax"))
    if reprs.get("kscale") is not None:
        per_block += reprs["kscale"][0].numel() * reprs["kscale"].element_size()
    return per_block * case["table"].numel()


def shape_rows(batch: int, context: int, ceiling: float) -> list[dict]:
    case = inputs(batch, context, 0)
    q, table, lens = case["q"], case["table"], case["lens"]
    shape = f"b{batch}_ctx{context}_ratio0.3"
    plan = plan_select(batch, NUM_KV_HEADS, HEAD_DIM, case["blocks"], **SIZES, device="cuda")
    rows = []
    for rule, reprs in case["reprs"].items():
        expected = [t.clone() for t in plan.run(q, block_table=table, seq_lens=lens, **reprs)]
        for name, variant in variants(plan).items():
            lists = variant.run(q, block_table=table, seq_lens=lens, **reprs)
            assert all(torch.equal(a, b) for a, b in zip(lists, expected)), f"{shape} {rule} {name}: lists differ"

            def select(variant=variant, lists=lists):
                return variant.run(q, block_table=table, seq_lens=lens, out=lists, **reprs)

            kernels = kernel_times(graph_of(select))
            score_ms = kernels["_score_kernel"] * 1e-3
            rows.append(row("select", f"ucm_{rule}_{name}", shape, median_ms(select)["cuda_graph"], mode="cuda_graph",
                            score_grid=variant.score_grid(),
                            kernels_us=kernels))
            rows.append(row("score_kernel", f"ucm_{rule}_{name}", shape, score_ms, summary_bytes(case, rule),
                            ceiling, mode="device_time"))
            print(rows[-2]["impl"], shape, rows[-2]["median_ms"], kernels, rows[-1].get("gbps"), flush=True)
    return rows


def main() -> None:
    """All shapes; the results file is rewritten after each, so a run cut short keeps the shapes it finished."""
    ceilings = measure_copy_ceilings()
    rows = []
    for batch, context in SHAPES:
        rows += shape_rows(batch, context, ceilings["hbm_read_gbps"])
        torch.cuda.empty_cache()
        path = write_results("score_ab", rows, ceilings, extra={
            "sizes": SIZES, "variants": {"per_sm_stages": PER_SM_STAGES},
            "timing": "do_bench median, L2 cleared before every call; cuda_graph: replay of the captured call; "
            "device_time: the kernel's time in a profiled replay"})
        print(path, flush=True)


if __name__ == "__main__":
    main()
