"""Programmatic dependent launch (PDL) off and in its two modes, one layer's decode kernels in CUDA graphs.

For each shape (1 x 32K, 1 x 128K, 8 x 128K, 32 x 32K; ``bench_sparse_decode``'s inputs and plans, Quest over
bf16 summaries) and each graph (our dense decode; select + attend at sparse_ratio 0.3 and at a 2048-token budget;
the reuse step of each, the selection launched with no row to reselect, then attention) a graph is captured under
each ``UCM_PDL`` setting of SETTINGS (``ucm_kernels._launch``). Their outputs must be bit-equal (the same kernels;
only when each may start differs). Times: ROUNDS rounds, each timing every graph (``do_bench`` median, L2 cleared
before every replay) in an order that rotates round by round; a row carries each setting's median over the rounds
and the median over rounds of off / that setting.

Usage, on the GPU: ``python -m bench.pdl_ab`` (JSON under $OUT or bench/results/).
"""
import statistics

import torch
from triton.testing import do_bench

from bench.bench_sparse_decode import build_case, graph_of, layer_steps
from bench.harness import run_shapes
from ucm_kernels._launch import pdl_mode, set_pdl

SHAPES = ((1, 32768), (1, 131072), (8, 131072), (32, 32768))
ROUNDS = 6
SETTINGS = ("0", "1", "early")  # UCM_PDL: off, launch as the programs exit, launch once they have all started


def captured(fn, setting: str) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph with ``UCM_PDL=setting``."""
    previous = set_pdl(setting)
    try:
        return graph_of(fn)
    finally:
        set_pdl(previous)


def ab_row(name: str, shape: str, fn) -> dict:
    """The graphs of ``fn`` (which returns the tensor it writes in place) under each setting, each replay checked
    bit-equal to an eager call, then timed in turns (the order rotating round by round)."""
    expected = fn().clone()
    graphs = {setting: captured(fn, setting) for setting in SETTINGS}
    for setting, graph in graphs.items():
        written = fn()  # the tensor the graphs write too
        written.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        if not torch.equal(written, expected):
            raise AssertionError(f"{shape} {name}: the replay with UCM_PDL={setting} differs from the eager call")
    times = {setting: [] for setting in SETTINGS}
    for round_ in range(ROUNDS):
        for setting in SETTINGS[round_ % 3:] + SETTINGS[:round_ % 3]:
            times[setting].append(do_bench(graphs[setting].replay, warmup=25, rep=100, return_mode="median") * 1e3)
    off = times["0"]
    row = {"name": name, "shape": shape, "pdl_mode_on_device": pdl_mode(torch.cuda.current_device()),
           **{f"us_pdl_{setting}": round(statistics.median(times[setting]), 2) for setting in SETTINGS},
           **{f"off_over_pdl_{setting}": round(statistics.median(a / b for a, b in zip(off, times[setting])), 4)
              for setting in SETTINGS[1:]},
           "rounds_us": {setting: [round(t, 2) for t in times[setting]] for setting in SETTINGS}}
    print(row, flush=True)
    return row


def shape_rows(batch: int, context: int) -> list[dict]:
    case = build_case(batch, context)
    out = torch.empty_like(case.q)
    return [ab_row(name, case.shape, step) for name, step in layer_steps(case, out).items()]


def main() -> None:
    run_shapes("pdl_ab", SHAPES, shape_rows, extra={"rounds": ROUNDS})


if __name__ == "__main__":
    main()
