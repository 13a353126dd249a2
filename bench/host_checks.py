"""Host time of one GSA layer's calls outside their kernel launches: argument checks, plan lookups, launch kwargs.

An eager decode step at batch 1 is bound by the host (BENCHMARKS.md: at 1 x 128K a layer's select + attend takes
~40 us of GPU time and ~127 us eager on the H100's host). This times, per call, ``SelectPlan.run`` (score + top-k)
and ``sparse_decode`` with a plan (split + combine) at 1 x 128K, a 2048-token budget, 32 query / 8 KV heads of 128,
with every ``Launcher`` call stubbed out, on CPU tensors under the Triton interpreter's device rules: what is left is
the Python each call runs before its launches, on the machine that runs this (median of ROUNDS rounds of CALLS
calls). The launches' own host time is ``bench/launch_overhead.py``'s (GPU).

    TRITON_INTERPRET=1 python -m bench.host_checks      # JSON under $OUT or bench/results/
"""
import os
import statistics
import timeit

import torch

from bench.harness import row, write_results
from ucm_kernels import _launch
from ucm_kernels.block_repr import empty_block_repr
from ucm_kernels.block_select import plan_select, selection_width
from ucm_kernels.sparse_decode import plan_decode, sparse_decode

CALLS, ROUNDS = 2000, 7
BATCH, KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK, BLOCKS = 1, 8, 32, 128, 16, 8192
SIZES = dict(block_size=BLOCK, sparse_ratio=0.3, init_window=1, local_window=4, min_blocks=8, token_budget=2048)


def layer_calls() -> dict:
    """{name: call} of one layer's selection and attention, plans made once as a decode step makes them."""
    kv = torch.zeros(2, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    kmin, kmax, kmean = empty_block_repr(kv[0])[:3]
    table = torch.arange(BLOCKS, dtype=torch.int32).view(BATCH, BLOCKS)
    lens = torch.full((BATCH,), BLOCKS * BLOCK, dtype=torch.int32)
    q = torch.zeros(BATCH, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    select_plan = plan_select(BATCH, KV_HEADS, HEAD_DIM, BLOCKS, **SIZES, device="cpu")
    width = selection_width(BLOCKS, **SIZES)
    decode_plan = plan_decode(q, kv[0], width)
    out = torch.empty_like(q)
    sel = (torch.zeros(BATCH, KV_HEADS, width, dtype=torch.int32), torch.zeros(BATCH, KV_HEADS, dtype=torch.int32))
    return {"select_plan_run": lambda: select_plan.run(q, kmin, kmax, kmean, table, lens, out=sel),
            "sparse_decode": lambda: sparse_decode(q, kv[0], kv[1], table, lens, *sel, out=out, plan=decode_plan)}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1: the calls take CPU tensors under the interpreter's rules")
    launched = []
    _launch.Launcher.__call__ = lambda self, grid, *params, **named: launched.append(grid)
    rows = []
    for name, call in layer_calls().items():
        us = statistics.median(timeit.repeat(call, number=CALLS, repeat=ROUNDS)) / CALLS * 1e6
        rows.append(row(name, "host_checks", f"b{BATCH}_ctx{BLOCKS * BLOCK}_budget2048", us / 1e3, calls=CALLS,
                        rounds=ROUNDS))
        print(f"{name}: {us:.1f} us a call outside its launches")
    assert launched, "no launch reached the stub: the calls did not run"
    print(write_results("host_checks", rows, {}))


if __name__ == "__main__":
    main()
