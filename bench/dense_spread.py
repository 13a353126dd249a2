"""Run-to-run spread of our dense decode against FlashInfer's: the same kernels timed in interleaved rounds, over
several random block tables, in one process.

bench_sparse_decode times each dense kernel once per run; across runs on the lent H200 our dense_decode's ratio to
FlashInfer's faster kernel moved between 0.93x and 1.05x at the same shapes. This bench separates the candidate
causes: ROUNDS interleaved timings of each kernel on one KV cache (noise of the timer and the clocks: the ratio
moves within a case) and CASES caches that differ only by their random physical block order (layout: the ratio
moves between cases, not within). bf16, 32 / 8 heads, head_dim 128, block 16, CUDA-graph replays timed by
triton's do_bench (L2 cleared before each call), as in bench_sparse_decode.

Usage (lent GPU, FlashInfer importable): ``python -m bench.dense_spread``; JSON under $OUT or bench/results/.
"""
import statistics

import torch
from triton.testing import do_bench

from bench import flashinfer_peer
from bench.bench_sparse_decode import graph_of, paged_inputs
from bench.harness import measure_copy_ceilings, row, write_results
from ucm_kernels.sparse_decode import dense_decode, plan_decode

SHAPES = [(1, 131072), (8, 131072), (32, 32768)]
CASES = 3  # random block orders per shape
ROUNDS = 8  # interleaved timings of each kernel per case
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def case_graphs(batch: int, context: int) -> dict:
    """{impl: CUDA graph} of one decode over a fresh random paged cache: ours and FlashInfer's two kernels."""
    q, kv, block_table, seq_lens, _, _ = paged_inputs(batch, context)
    out = torch.empty_like(q)
    plan = plan_decode(q, kv[0], context // BLOCK_SIZE, dense=True)
    peers = flashinfer_peer.dense_decoders(block_table, seq_lens, num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
                                           head_dim=HEAD_DIM, page_size=BLOCK_SIZE, dtype=q.dtype)
    calls = {"ucm_dense": lambda: dense_decode(q, kv[0], kv[1], block_table, seq_lens, out=out, plan=plan)}
    calls.update({impl: (lambda p=p: p.run(q, kv[0], kv[1], out=out)) for impl, p in peers.items()})
    graphs = {impl: graph_of(fn) for impl, fn in calls.items()}
    graphs["_keep"] = (q, kv, block_table, seq_lens, out, peers)  # alive while the graphs replay
    return graphs


def spread_rows(batch: int, context: int) -> list[dict]:
    """Per case: each kernel's median over ROUNDS interleaved timings, ours over the faster FlashInfer per round
    (median, min, max)."""
    rows = []
    for case in range(CASES):
        graphs = case_graphs(batch, context)
        times = {impl: [] for impl in graphs if impl != "_keep"}
        for _ in range(ROUNDS):
            for impl in times:
                times[impl].append(do_bench(graphs[impl].replay, warmup=10, rep=50, return_mode="median"))
        ratios = [min(fi, tc) / ours for ours, fi, tc in zip(times["ucm_dense"], times["flashinfer"],
                                                             times["flashinfer_tc"])]
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
        for impl, ms in times.items():
            rows.append(row("dense_spread", impl, f"b{batch}_ctx{context}", statistics.median(ms), kv_bytes,
                            case=case, rounds_ms=[round(t, 5) for t in ms]))
        rows.append({"name": "dense_spread", "impl": "ucm_over_faster_flashinfer", "shape": f"b{batch}_ctx{context}",
                     "case": case, "median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
                     "max": round(max(ratios), 4)})
        print(rows[-1], flush=True)
        del graphs
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    if flashinfer_peer.available() is None:
        raise SystemExit("FlashInfer is not importable: see bench/flashinfer_peer.py")
    torch.manual_seed(0)
    rows = [r for batch, context in SHAPES for r in spread_rows(batch, context)]
    print(write_results("dense_spread", rows, measure_copy_ceilings(),
                        extra={"cases": CASES, "rounds": ROUNDS, "flashinfer": flashinfer_peer.available()}))


if __name__ == "__main__":
    main()
