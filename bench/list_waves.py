"""Even waves for the list attention: split counts that give every SM the same number of programs.

Nsight Compute at 1 x 128K (BENCHMARKS.md, "Why lists read slower than dense") found the list launch's SMs idle 11.5%
of its time against dense's 6.4%: 496 programs on 132 SMs are 4 on 100 SMs and 3 on 32. ``plan_decode`` rounds a
split's list entries to whole 128-token tiles, which fixes the split count; here plans are made with chunks of any
length (the last tile of a split masked), so that ``batch x num_kv_heads x splits`` is ``k`` programs on every SM
for k in PROGRAMS_PER_SM (splits at most ``_MAX_SPLITS``). Each plan's output is checked against the default plan's
(relative L2, as bench_sparse_decode checks), then timed from a CUDA graph (``do_bench`` median, L2 cleared).

Usage, on the GPU: ``python -m bench.list_waves`` (JSON under $OUT or bench/results/).
"""
import dataclasses

import torch

from bench.bench_sparse_decode import BLOCK_SIZE, NUM_KV_HEADS, check, paged_inputs
from bench.harness import measure_copy_ceilings, row, write_results
from bench.list_locality import random_lists
from bench.sweep_decode_tiles import graph_ms
from ucm_kernels.sparse_decode import DecodePlan, plan_decode, sparse_decode
from ucm_kernels.sparse_decode.triton import _MAX_SPLITS

SHAPES = ((1, 131072, 2458), (1, 131072, 128), (8, 131072, 2458))  # (batch, context, listed blocks)
PROGRAMS_PER_SM = (2, 3, 4)


def plan_with_chunk(plan: DecodePlan, chunk_blocks: int, device: torch.device) -> DecodePlan:
    """``plan`` with splits of ``chunk_blocks`` list entries (any length; a list shorter than the plan's widest is
    cut into as many splits, each no longer) and scratch for their count on ``device``."""
    splits = -(-plan.max_blocks // chunk_blocks)
    scratch = (plan.batch, plan.num_q_heads, splits)
    return dataclasses.replace(
        plan, num_splits=splits, chunk_blocks=chunk_blocks,
        acc=torch.empty(*scratch, plan.head_dim, dtype=torch.float32, device=device) if splits > 1 else None,
        stats=torch.empty(*scratch, 2, dtype=torch.float32, device=device) if splits > 1 else None)


def even_chunks(batch: int, listed: int, sms: int) -> dict[int, int]:
    """{programs per SM: chunk length} whose split count puts that many programs on each SM (as near as whole
    entries allow)."""
    found = {}
    for per_sm in PROGRAMS_PER_SM:
        splits = min(_MAX_SPLITS, max(1, per_sm * sms // (batch * NUM_KV_HEADS)))
        found[per_sm] = -(-listed // splits)
    return found


def shape_rows(batch: int, context: int, listed: int, hbm_gbps: float) -> list[dict]:
    q, kv, table, lens, dense_k, dense_v = paged_inputs(batch, context)
    del dense_k, dense_v
    sel_idx, sel_count = random_lists(batch, context, listed, False, "cuda")
    default = plan_decode(q, kv[0], listed)
    out = torch.empty_like(q)
    expected = sparse_decode(q, kv[0], kv[1], table, lens, sel_idx, sel_count, plan=default).clone()
    shape = f"b{batch}_ctx{context}_list{listed}"
    nbytes = 2 * batch * NUM_KV_HEADS * listed * BLOCK_SIZE * kv[0].shape[-1] * kv[0].element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plans = {"default": default} | {f"even_{per_sm}_per_sm": plan_with_chunk(default, chunk, q.device)
                                    for per_sm, chunk in even_chunks(batch, listed, sms).items()}
    rows = []
    for name, plan in plans.items():
        check(f"{shape} {name}", sparse_decode(q, kv[0], kv[1], table, lens, sel_idx, sel_count, plan=plan, out=out),
              expected)
        ms = graph_ms(lambda: sparse_decode(q, kv[0], kv[1], table, lens, sel_idx, sel_count, plan=plan, out=out))
        programs = batch * NUM_KV_HEADS * plan.num_splits
        rows.append(row("list_attend", name, shape, ms, nbytes, hbm_gbps, num_splits=plan.num_splits,
                        chunk_blocks=plan.chunk_blocks, programs=programs, sms=sms))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.manual_seed(0)
    ceilings = measure_copy_ceilings()
    rows = []
    for shape in SHAPES:
        rows += shape_rows(*shape, ceilings["hbm_read_gbps"])
        torch.cuda.empty_cache()
        path = write_results("list_waves", rows, ceilings)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
