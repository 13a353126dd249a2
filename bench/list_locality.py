"""Why sparse_decode over GSA's lists reads the HBM slower than dense_decode: the KV layout and the lists' overlap.

At 1 x 128K, sparse_ratio 0.3, our list attention reads 2.8 TB/s where dense decode reads 3.8 (BENCHMARKS.md), and
no launch setting changes it (``bench/sweep_decode_tiles.py --lists``). In vLLM's NHD layout (``[blocks,
block_size, kv_heads, head_dim]``) one KV head's share of a block is ``block_size`` rows of ``head_dim`` elements
(256 B in bf16) a whole token apart; dense decode's programs for the 8 heads read the neighbouring rows of the same
blocks, GSA's read different blocks per head. Two changes, each alone, tell which costs what:

* ``heads_share_list``: every KV head attends the same list (the first head's), so the heads' reads meet again;
* ``hnd``: the same lists over an HND cache (``[blocks, kv_heads, block_size, head_dim]``, vLLM's layout with
  ``VLLM_KV_CACHE_LAYOUT=HND``), where one head's share of a block is one contiguous run (4 KB here).

bf16, 32 query / 8 KV heads, head_dim 128, block 16, physical blocks shuffled, lists ascending random logical blocks
per (request, KV head); shapes 1 and 8 x 128K, lists of 2458 blocks (sparse_ratio 0.3) and 128 (a 2048-token
budget). Each variant's output is checked against the NHD per-head run over the same lists (the layouts hold the
same values) before it is timed; CUDA-graph replays, ``do_bench`` medians with the L2 cleared. Dense decode over
each layout is the ceiling of the same run.

Usage (lent GPU): ``python -m bench.list_locality``; JSON under $OUT or bench/results/. ``--smoke``: the same code
and checks at two tiny shapes on the CPU (Triton interpreter), no JSON (tests/benchmarks/test_list_locality.py).
"""
import sys
import time

import torch

from bench.bench_sparse_decode import BLOCK_SIZE, DTYPE, HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, check
from bench.harness import measure_copy_ceilings, row, write_results
from bench.sweep_decode_tiles import graph_ms
from ucm_kernels.sparse_decode import dense_decode, plan_decode, sparse_decode

SHAPES = [(1, 131072), (8, 131072)]
LIST_BLOCKS = {"ratio0.3": 2458, "budget2048": 128}
SMOKE_LIST_BLOCKS = {"ratio0.3": 19, "budget2048": 4}  # of 64 blocks (1K tokens)


def caches(batch: int, context: int, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layout: (key_cache, value_cache)}, both ``[blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM]`` views holding the
    same random values: "nhd" contiguous, "hnd" over ``[blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM]`` storage."""
    blocks = batch * context // BLOCK_SIZE
    nhd = torch.randn(2, blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    hnd = nhd.transpose(2, 3).contiguous().transpose(2, 3)
    return {"nhd": (nhd[0], nhd[1]), "hnd": (hnd[0], hnd[1])}


def random_lists(batch: int, context: int, count: int, shared: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``sel_idx [batch, NUM_KV_HEADS, count]`` int32 ascending random logical blocks (each head its own, or the
    first head's for all when ``shared``) and ``sel_count [batch, NUM_KV_HEADS]``."""
    blocks = context // BLOCK_SIZE
    heads = 1 if shared else NUM_KV_HEADS
    scores = torch.rand(batch, heads, blocks, device=device)
    sel_idx = scores.topk(count, dim=-1).indices.sort(dim=-1).values.int()
    sel_idx = sel_idx.expand(batch, NUM_KV_HEADS, count).contiguous()
    return sel_idx, torch.full((batch, NUM_KV_HEADS), count, dtype=torch.int32, device=device)


def shape_rows(batch: int, context: int, list_blocks: dict[str, int], hbm_gbps: float | None, device: str = "cuda",
               timer=graph_ms) -> list[dict]:
    """Dense and list attention over both layouts, per-head and shared lists (``list_blocks``: selection name ->
    blocks per list), at one shape, each timed by ``timer(fn) -> ms``."""
    blocks = context // BLOCK_SIZE
    kv = caches(batch, context, device)
    table = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    out = torch.empty_like(q)
    shape = f"b{batch}_ctx{context}"
    dense_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    rows, dense_plan = [], plan_decode(q, kv["nhd"][0], blocks, dense=True)
    reference = dense_decode(q, *kv["nhd"], table, lens, plan=dense_plan).clone()
    for layout, (k, v) in kv.items():
        check(f"{shape} dense {layout}", dense_decode(q, k, v, table, lens, plan=dense_plan), reference)
        rows.append(row("dense_attend", f"ucm_{layout}", shape, timer(
            lambda: dense_decode(q, k, v, table, lens, plan=dense_plan, out=out)), dense_bytes, hbm_gbps))
    for selection, count in list_blocks.items():
        plan = plan_decode(q, kv["nhd"][0], count)
        nbytes = dense_bytes * count // blocks
        for lists in ("per_head", "heads_share_list"):
            sel_idx, sel_count = random_lists(batch, context, count, lists == "heads_share_list", device)
            expected = sparse_decode(q, *kv["nhd"], table, lens, sel_idx, sel_count, plan=plan).clone()
            for layout, (k, v) in kv.items():
                check(f"{shape} {selection} {lists} {layout}",
                      sparse_decode(q, k, v, table, lens, sel_idx, sel_count, plan=plan), expected)
                rows.append(row("list_attend", f"ucm_{layout}_{lists}", f"{shape}_{selection}", timer(
                    lambda: sparse_decode(q, k, v, table, lens, sel_idx, sel_count, plan=plan, out=out)),
                    nbytes, hbm_gbps, list_blocks=count, num_splits=plan.num_splits))
    return rows


def wall_ms(fn) -> float:
    """One call's wall time in ms (the CPU smoke run: the interpreter's time means nothing, the checks do)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    """The GPU run (JSON written), or with ``--smoke`` two tiny shapes through the same code and checks on the CPU
    (the Triton interpreter); returns the rows."""
    if argv is not None and "--smoke" in argv:
        return [r for batch in (1, 2) for r in shape_rows(batch, 1024, SMOKE_LIST_BLOCKS, None, "cpu", wall_ms)]
    ceilings = measure_copy_ceilings()
    rows = []
    for batch, context in SHAPES:
        rows += shape_rows(batch, context, LIST_BLOCKS, ceilings["hbm_read_gbps"])
        torch.cuda.empty_cache()
    for r in rows:
        print(f"{r['shape']:28s} {r['impl']:28s} {r['median_ms']:.4f} ms {r['gbps']:7.0f} GB/s")
    print(f"wrote {write_results('list_locality', rows, ceilings)}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
