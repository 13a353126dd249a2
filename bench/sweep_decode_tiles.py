"""Launch settings of our dense decode kernel swept on the GPU, against FlashInfer and SDPA in the same run.

For each shape (bf16, 32 query / 8 KV heads, head_dim 128, block 16, shuffled physical blocks): every (tile
tokens, num_warps, num_stages, splits) of the grid below runs ``dense_decode`` with a hand-made
``DecodePlan``, checked against SDPA before it is timed (as FlashInfer is); CUDA-graph replay, ``do_bench``
median, L2 cleared. The plan that ``plan_decode`` picks today is timed beside them, with the peers. What the sweep finds goes into
``ucm_kernels.sparse_decode.triton._choose_tile`` / ``_choose_num_splits``; this script records why.

Usage (lent GPU): ``python -m bench.sweep_decode_tiles``; JSON under $OUT or bench/results/.
"""
import dataclasses
import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from bench import flashinfer_peer
from bench.bench_sparse_decode import (BLOCK_SIZE, DTYPE, HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, check, graph_of,
                                       paged_inputs)
from bench.harness import measure_copy_ceilings, row, write_results
from ucm_kernels.sparse_decode import dense_decode, plan_decode

SHAPES = [(1, 131072), (8, 131072), (32, 32768)]  # issue 18's dense targets
TILES = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4, 5)
SPLIT_FACTORS = (0.5, 1, 2)  # times the programs plan_decode aims at (8 per SM)


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
    del k, v
    if flashinfer_peer.available():
        peers = flashinfer_peer.dense_decoders(table, lens, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
                                               head_dim=HEAD_DIM, page_size=BLOCK_SIZE, dtype=DTYPE)
        for impl, peer in peers.items():
            out = torch.full_like(q, float("nan"))
            check(f"{shape} {impl} vs SDPA", peer.run(q, kv[0], kv[1], out=out), reference)
            rows.append(row("decode_dense", impl, shape, graph_ms(lambda: peer.run(q, kv[0], kv[1], out=out)),
                            nbytes, hbm_gbps))
    default = plan_decode(q, kv[0], blocks, dense=True)
    out = torch.empty_like(q)
    rows.append(row("decode_dense", "ucm_default_plan", shape, graph_ms(
        lambda: dense_decode(q, kv[0], kv[1], table, lens, out=out, plan=default)), nbytes, hbm_gbps,
        tile_tokens=default.tile_tokens, num_warps=default.num_warps, num_stages=default.num_stages,
        num_splits=default.num_splits))
    for factor in SPLIT_FACTORS:
        splits = max(1, round(default.num_splits * factor))
        base = plan_decode(q, kv[0], blocks, num_splits=splits, dense=True)
        for tile, warps, stages in itertools.product(TILES, WARPS, STAGES):
            plan = dataclasses.replace(base, tile_tokens=tile, num_warps=warps, num_stages=stages)
            out = torch.full_like(q, float("nan"))
            try:
                result = dense_decode(q, kv[0], kv[1], table, lens, out=out, plan=plan)
            except Exception as e:  # out of shared memory or registers: recorded, not timed
                rows.append({"name": "decode_dense", "impl": "ucm_swept", "shape": shape, "tile_tokens": tile,
                             "num_warps": warps, "num_stages": stages, "num_splits": plan.num_splits,
                             "failed": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            check(f"{shape} tile {tile} warps {warps} stages {stages} splits {plan.num_splits}", result, reference)
            rows.append(row("decode_dense", "ucm_swept", shape, graph_ms(
                lambda: dense_decode(q, kv[0], kv[1], table, lens, out=out, plan=plan)), nbytes, hbm_gbps,
                tile_tokens=tile, num_warps=warps, num_stages=stages, num_splits=plan.num_splits))
    return rows


def summary(rows: list[dict]) -> dict:
    """Per shape: the best swept settings, today's plan and the fastest peer (ms)."""
    found = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and "median_ms" in r]
        swept = min((r for r in mine if r["impl"] == "ucm_swept"), key=lambda r: r["median_ms"])
        peer = min((r for r in mine if not r["impl"].startswith("ucm")), key=lambda r: r["median_ms"])
        default = next(r for r in mine if r["impl"] == "ucm_default_plan")
        found[shape] = {"best": {k: swept[k] for k in ("median_ms", "tile_tokens", "num_warps", "num_stages",
                                                         "num_splits")},
                        "default_ms": default["median_ms"], "peer": peer["impl"], "peer_ms": peer["median_ms"],
                        "best_vs_peer": round(peer["median_ms"] / swept["median_ms"], 3)}
    return found


def main() -> None:
    torch.manual_seed(0)
    ceilings = measure_copy_ceilings()
    rows = []
    for batch, context in SHAPES:
        rows += sweep_shape(batch, context, ceilings["hbm_read_gbps"])
        torch.cuda.empty_cache()
        path = write_results("sweep_decode_tiles", rows, ceilings, extra={"summary": summary(rows)})
        print(f"b{batch}_ctx{context}: {summary(rows)[f'b{batch}_ctx{context}']}", flush=True)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
