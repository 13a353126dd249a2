"""Launch settings of our decode kernels swept on the GPU: dense decode against FlashInfer and SDPA in the same
run, and sparse decode over GSA-sized block lists.

For each dense shape (bf16, 32 query / 8 KV heads, head_dim 128, block 16, shuffled physical blocks): every
(tile tokens, num_warps, num_stages, splits) of the grid below runs ``dense_decode`` with a hand-made
``DecodePlan``, checked against SDPA before it is timed (as FlashInfer is); CUDA-graph replay, ``do_bench``
median, L2 cleared. The plan that ``plan_decode`` picks today is timed beside them, with the peers. The list
shapes (LIST_SHAPES: sparse_ratio 0.3 and a 2048-token budget at 128K) run ``sparse_decode`` over random
ascending lists of that many blocks per (request, KV head), each setting checked against the default plan's
output (itself checked against the loop reference on two requests). What the sweep finds goes into
``ucm_kernels.sparse_decode.triton._choose_tile`` / ``_choose_num_splits``; this script records why.

Usage (lent GPU): ``python -m bench.sweep_decode_tiles``; JSON under $OUT or bench/results/.
"""
import argparse
import dataclasses
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from bench import flashinfer_peer
from bench.bench_sparse_decode import (BLOCK_SIZE, DTYPE, HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, check, graph_of,
                                       paged_inputs)
from bench.harness import measure_copy_ceilings, row, write_results
from ucm_kernels.sparse_decode import dense_decode, plan_decode, sparse_decode
from ucm_kernels.sparse_decode.naive import naive_sparse_decode

SHAPES = [(1, 131072), (8, 131072), (32, 32768)]  # issue 18's dense targets
TILES = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4, 5)
SPLIT_FACTORS = (0.5, 1, 2)  # times the programs plan_decode aims at
LIST_SHAPES = [(1, 131072, 2458), (8, 131072, 2458), (1, 131072, 128), (8, 131072, 128)]  # list blocks: 0.3, 2048


def graph_ms(fn) -> float:
    graph = graph_of(fn)
    ms = do_bench(graph.replay, warmup=10, rep=50, return_mode="median")
    del graph
    return ms


def sweep_shape(batch: int, context: int, hbm_gbps: float) -> list[dict]:
    blocks = context // BLOCK_SIZE
    q, kv, table, lens, k, v = paged_inputs(batch, context)
    reference = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    shape, nbytes = f"b{batch}_ctx{context}", 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    rows = [row("decode_dense", "sdpa", shape, graph_ms(
        lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)), nbytes, hbm_gbps)]
    k = v = None  # the contiguous copies are only for SDPA: freed before the paged kernels run
    if flashinfer_peer.available():
        peers = flashinfer_peer.dense_decoders(table, lens, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
                                               head_dim=HEAD_DIM, page_size=BLOCK_SIZE, dtype=DTYPE)
        for impl, peer in peers.items():
            out = torch.full_like(q, float("nan"))
            check(f"{shape} {impl} vs SDPA", peer.run(q, kv[0], kv[1], out=out), reference)
            rows.append(row("decode_dense", impl, shape, graph_ms(lambda: peer.run(q, kv[0], kv[1], out=out)),
                            nbytes, hbm_gbps))
    return rows + sweep_grid("decode_dense", shape, nbytes, hbm_gbps, reference, blocks, q, kv[0], True,
                             lambda out, plan: dense_decode(q, kv[0], kv[1], table, lens, out=out, plan=plan))


def sweep_lists(batch: int, context: int, listed: int, hbm_gbps: float) -> list[dict]:
    """sparse_decode over ``listed`` random ascending blocks per (request, KV head) of a ``context``-token
    sequence, every setting of the grid and the default plan."""
    blocks = context // BLOCK_SIZE
    q, kv, table, lens, k, v = paged_inputs(batch, context)
    del k, v
    scores = torch.rand(batch, NUM_KV_HEADS, blocks, device="cuda")
    sel_idx = scores.topk(listed, dim=-1).indices.sort(dim=-1).values.int()
    sel_count = torch.full((batch, NUM_KV_HEADS), listed, dtype=torch.int32, device="cuda")
    shape = f"b{batch}_ctx{context}_list{listed}"
    nbytes = 2 * batch * NUM_KV_HEADS * listed * BLOCK_SIZE * HEAD_DIM * DTYPE.itemsize
    reference = sparse_decode(q, kv[0], kv[1], table, lens, sel_idx, sel_count)
    rows_checked = [0, batch - 1]
    check(f"{shape} sparse_decode vs naive", reference[rows_checked], naive_sparse_decode(
        q[rows_checked], kv[0], kv[1], table[rows_checked], lens[rows_checked], sel_idx[rows_checked],
        sel_count[rows_checked]))
    return sweep_grid("sparse_attend", shape, nbytes, hbm_gbps, reference, listed, q, kv[0], False,
                      lambda out, plan: sparse_decode(q, kv[0], kv[1], table, lens, sel_idx, sel_count, out=out,
                                                      plan=plan))


def sweep_grid(name: str, shape: str, nbytes: int, hbm_gbps: float, reference: torch.Tensor, max_blocks: int,
               q: torch.Tensor, key_cache: torch.Tensor, dense: bool, call) -> list[dict]:
    """``call(out, plan)`` timed with the default plan and every (splits, tile, warps, stages) of the grid, each
    checked against ``reference`` first."""
    default = plan_decode(q, key_cache, max_blocks, dense=dense)
    out = torch.empty_like(q)
    rows = [row(name, "ucm_default_plan", shape, graph_ms(lambda: call(out, default)), nbytes, hbm_gbps,
                tile_tokens=default.tile_tokens, num_warps=default.num_warps, num_stages=default.num_stages,
                num_splits=default.num_splits)]
    for factor in SPLIT_FACTORS:
        splits = max(1, round(default.num_splits * factor))
        base = plan_decode(q, key_cache, max_blocks, num_splits=splits, dense=dense)
        for tile, warps, stages in itertools.product(TILES, WARPS, STAGES):
            plan = dataclasses.replace(base, tile_tokens=tile, num_warps=warps, num_stages=stages)
            out = torch.full_like(q, float("nan"))
            settings = dict(tile_tokens=tile, num_warps=warps, num_stages=stages, num_splits=plan.num_splits)
            try:
                result = call(out, plan)
            except Exception as e:  # out of shared memory or registers: recorded, not timed
                rows.append({"name": name, "impl": "ucm_swept", "shape": shape, **settings,
                             "failed": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            check(f"{shape} {settings}", result, reference)
            rows.append(row(name, "ucm_swept", shape, graph_ms(lambda: call(out, plan)), nbytes, hbm_gbps,
                            **settings))
    return rows


def summary(rows: list[dict]) -> dict:
    """Per shape: the best swept settings, today's plan and the fastest peer (ms)."""
    found = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and "median_ms" in r]
        swept = min((r for r in mine if r["impl"] == "ucm_swept"), key=lambda r: r["median_ms"])
        default = next(r for r in mine if r["impl"] == "ucm_default_plan")
        found[shape] = {"best": {k: swept[k] for k in ("median_ms", "gbps", "tile_tokens", "num_warps",
                                                         "num_stages", "num_splits")},
                        "default_ms": default["median_ms"], "default_gbps": default["gbps"]}
        peers = [r for r in mine if not r["impl"].startswith("ucm")]
        if peers:
            peer = min(peers, key=lambda r: r["median_ms"])
            found[shape] |= {"peer": peer["impl"], "peer_ms": peer["median_ms"],
                             "best_vs_peer": round(peer["median_ms"] / swept["median_ms"], 3)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", action="store_true", help="sweep sparse_decode over LIST_SHAPES, not dense")
    args = parser.parse_args()
    torch.manual_seed(0)
    ceilings = measure_copy_ceilings()
    rows = []
    jobs = [(sweep_lists, shape) for shape in LIST_SHAPES] if args.lists else [(sweep_shape, s) for s in SHAPES]
    for sweep, shape in jobs:
        rows += sweep(*shape, ceilings["hbm_read_gbps"])
        torch.cuda.empty_cache()
        found = summary(rows)
        path = write_results("sweep_list_tiles" if args.lists else "sweep_decode_tiles", rows, ceilings,
                             extra={"summary": found})
        print(f"{rows[-1]['shape']}: {found[rows[-1]['shape']]}", flush=True)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
