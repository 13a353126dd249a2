"""Host time of one kernel launch on the GPU machine: what a decode step's launches cost the host, by path.

Eager decode steps spend host time on every launch of every layer; where that exceeds the GPU time of the step's
small kernels, the step is host-bound. This measures, per launch (median of ROUNDS rounds of CALLS calls, the host
clock stopped before the one sync of a round), a do-nothing Triton kernel with 4 and with 40 arguments launched
* ``jit``: as the library launches today (``kernel[grid](...)``: argument binding, specialisation, cache lookup);
* ``compiled_run``: straight through the compiled kernel's launcher (the floor a lighter launch path could reach);
* ``ucm_launcher``: through :class:`ucm_kernels._launch.Launcher` (argument classes keyed, then the launcher);
* ``graph_replay``: the same CALLS launches captured once in a CUDA graph, host time of one replay / CALLS;
and ``torch.zeros`` / ``torch.empty`` of a 5-element tensor for scale. Usage: ``python -m bench.launch_overhead``
(JSON under $OUT or bench/results/).
"""
import statistics
import time

import torch
import triton
import triton.language as tl

from bench.harness import row, write_results
from ucm_kernels._launch import Launcher

CALLS, ROUNDS = 200, 15


@triton.jit
def _touch4(a, b, c, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(a + offs, tl.load(b + offs, mask=offs < n) + tl.load(c + offs, mask=offs < n), mask=offs < n)


@triton.jit(do_not_specialize=[f"n{i}" for i in range(16)])
def _touch40(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16, p17, p18, p19,
             n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12, n13, n14, n15,
             A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    total = n0 + n1 + n2 + n3 + n4 + n5 + n6 + n7 + n8 + n9 + n10 + n11 + n12 + n13 + n14 + n15
    tl.store(p0 + offs, tl.load(p19 + offs) + total + A + B + C)


def host_us_per_call(launch) -> float:
    """Median over ROUNDS of host microseconds per ``launch()``, CALLS calls a round, synced between rounds."""
    rounds = []
    for _ in range(ROUNDS + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(CALLS):
            launch()
        rounds.append((time.perf_counter() - start) * 1e6 / CALLS)
        torch.cuda.synchronize()
    return statistics.median(rounds[1:])


def launches(kernel, grid, args, constexprs) -> dict:
    """{path: launch callable} of one kernel and argument list."""
    compiled = kernel[grid](*args, **constexprs)

    def compiled_run():
        stream = torch.cuda.current_stream().cuda_stream
        compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
                     *constexprs.values())

    def jit():
        kernel[grid](*args, **constexprs)

    launcher = Launcher(kernel)
    params = (*args, *constexprs.values())

    def ucm_launcher():
        launcher(grid, *params)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            jit()
    ucm_launcher()
    return {"jit": jit, "compiled_run": compiled_run, "ucm_launcher": ucm_launcher, "graph_replay": graph.replay}


def main():
    device = torch.device("cuda")
    buffers = [torch.zeros(64, dtype=torch.float32, device=device) for _ in range(20)]
    cases = {"touch4": (_touch4, (buffers[0], buffers[1], buffers[2], 64), {"BLOCK": 64}),
             "touch40": (_touch40, (*buffers, *range(16)), {"A": 1, "B": 2, "C": 3, "BLOCK": 64})}
    rows = []
    for name, (kernel, args, constexprs) in cases.items():
        for path, launch in launches(kernel, (1,), args, constexprs).items():
            per_call = host_us_per_call(launch)
            if path == "graph_replay":
                per_call /= CALLS
            rows.append(row("launch_host_us", path, name, per_call / 1e3) | {"host_us": round(per_call, 2)})
    for name, make in (("torch_zeros5", lambda: torch.zeros(5, dtype=torch.int32, device=device)),
                       ("torch_empty5", lambda: torch.empty(5, dtype=torch.int32, device=device))):
        per_call = host_us_per_call(make)
        rows.append(row("launch_host_us", "torch", name, per_call / 1e3) | {"host_us": round(per_call, 2)})
    for r in rows:
        print(f"{r['shape']:>14} {r['impl']:>14} {r['host_us']:8.2f} us")
    print(write_results("launch_overhead", rows, {}, extra={
        "timing": f"host clock per call, median of {ROUNDS} rounds of {CALLS} calls (sync between rounds)"}))


if __name__ == "__main__":
    main()
