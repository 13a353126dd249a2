"""Programmatic dependent launch (PDL) on and off, one layer's decode kernels in CUDA graphs, in one process.

For each shape (1 x 32K, 1 x 128K, 8 x 128K, 32 x 32K; ``bench_sparse_decode``'s inputs and plans, Quest over
bf16 summaries) and each graph (our dense decode; select + attend at sparse_ratio 0.3 and at a 2048-token budget;
the reuse step of each, the selection launched with no row to reselect, then attention) two graphs are captured:
with ``UCM_PDL=0`` and with PDL as the launchers choose it (on from sm_90). Their outputs must be bit-equal (the
same kernels; only when each may start differs). Times: ROUNDS rounds, each timing both graphs (``do_bench``
median, L2 cleared before every replay) in an order that alternates round by round; a row carries each mode's
median over the rounds and the median over rounds of off / on.

Usage, on the GPU: ``python -m bench.pdl_ab`` (JSON under $OUT or bench/results/).
"""
import os
import statistics

import torch
from triton.testing import do_bench

from bench.bench_sparse_decode import SELECTIONS, attend, build_case, dense, graph_of, reused_step, select
from bench.harness import run_shapes
from ucm_kernels._launch import PDL_ENV, pdl_enabled

SHAPES = ((1, 32768), (1, 131072), (8, 131072), (32, 32768))
ROUNDS = 5


def captured(fn, pdl: bool) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph with PDL on (as the launchers choose it) or off."""
    previous = os.environ.get(PDL_ENV)
    os.environ[PDL_ENV] = "1" if pdl else "0"
    try:
        return graph_of(fn)
    finally:
        if previous is None:
            del os.environ[PDL_ENV]
        else:
            os.environ[PDL_ENV] = previous


def ab_row(name: str, shape: str, fn) -> dict:
    """Both graphs of ``fn`` (which returns the tensor it writes in place), each replay checked bit-equal to an
    eager call, then timed in turns."""
    expected = fn().clone()
    graphs = {pdl: captured(fn, pdl) for pdl in (False, True)}
    for pdl, graph in graphs.items():
        written = fn()  # the tensor the graphs write too
        written.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        if not torch.equal(written, expected):
            raise AssertionError(f"{shape} {name}: the replay with pdl={pdl} differs from the eager call")
    times = {False: [], True: []}
    for round_ in range(ROUNDS):
        for pdl in ((False, True) if round_ % 2 == 0 else (True, False)):
            times[pdl].append(do_bench(graphs[pdl].replay, warmup=25, rep=100, return_mode="median") * 1e3)
    row = {"name": name, "shape": shape, "pdl_on_device": pdl_enabled(torch.cuda.current_device()),
           "off_us": round(statistics.median(times[False]), 2), "on_us": round(statistics.median(times[True]), 2),
           "off_over_on": round(statistics.median(off / on for off, on in zip(times[False], times[True])), 4),
           "rounds_us": {"off": [round(t, 2) for t in times[False]], "on": [round(t, 2) for t in times[True]]}}
    print(row, flush=True)
    return row


def shape_rows(batch: int, context: int) -> list[dict]:
    case = build_case(batch, context)
    out = torch.empty_like(case.q)
    rows = [ab_row("dense", case.shape, lambda: dense(case, out))]
    for selection in SELECTIONS:
        rows.append(ab_row(f"select_attend_{selection}", case.shape,
                           lambda: attend(case, selection, *select(case, selection, "quest"), out)))
        kept = tuple(t.clone() for t in select(case, selection, "quest"))
        rows.append(ab_row(f"reuse_step_{selection}", case.shape, reused_step(case, selection, "quest", kept, out)))
    return rows


def main() -> None:
    run_shapes("pdl_ab", SHAPES, shape_rows, extra={"rounds": ROUNDS})


if __name__ == "__main__":
    main()
