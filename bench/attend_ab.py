"""The list attention at 1 x 128K per layer of an 8-layer CUDA graph, with the combine merging 16, 32 or 64 splits
a loop step (``sparse_decode.triton._SPLITS_TILE``), beside the dense decodes of the same graphs.

At batch 1 a 30% list runs as 62 splits a KV head, so the combine's loop takes four steps of 16 (since 4563cb3;
before, one step of 64): is that visible in a layer's time? Each layer of the graph has its own KV, query and Quest
lists (``sliced_topk_ab.inputs``); every tile setting's output is checked against the loop reference on the first
layer before anything is timed. Timed: CUDA-graph replay of the 8 layers, do_bench median, L2 cleared, per layer;
and each kernel's device time per layer (torch.profiler over replays).

    python -m bench.attend_ab     # JSON under $OUT or bench/results/
"""
import torch

from bench.bench_sparse_decode import BLOCK_SIZE, HEAD_DIM, NUM_KV_HEADS, check, graph_of, median_ms
from bench.harness import measure_copy_ceilings, row, write_results
from bench.profile_gsa_kernels import kernel_times
from bench.sliced_topk_ab import LAYERS, SIZES, dense_steps, inputs
from ucm_kernels.block_select import plan_select, selection_width
from ucm_kernels.sparse_decode import plan_decode, sparse_decode
from ucm_kernels.sparse_decode import triton as sparse_decode_triton
from ucm_kernels.sparse_decode.naive import naive_sparse_decode

SELECTIONS = {"ratio0.3": {**SIZES, "token_budget": None}, "budget2048": SIZES}
SPLITS_TILES = (16, 32, 64)


def with_splits_tile(tile: int, fn):
    """``fn()`` with the combine merging ``tile`` splits a loop step."""
    kept = sparse_decode_triton._SPLITS_TILE
    sparse_decode_triton._SPLITS_TILE = tile
    try:
        return fn()
    finally:
        sparse_decode_triton._SPLITS_TILE = kept


def layered_attend_rows(cases: list[dict], selection: str, sizes: dict) -> list[dict]:
    """Per-layer rows of attention over each layer's Quest lists at every splits tile, and of the dense decodes."""
    first, blocks = cases[0], cases[0]["blocks"]
    shape = f"b1_ctx{blocks * BLOCK_SIZE}_{selection}_L{LAYERS}"
    out = torch.empty_like(first["q"])
    decode_plan = plan_decode(first["q"], first["kv"][0], selection_width(blocks, **sizes))
    select_plan = plan_select(1, NUM_KV_HEADS, HEAD_DIM, blocks, **sizes, device="cuda")
    lists = [select_plan.run(c["q"], block_table=c["table"], seq_lens=c["lens"], **c["reprs"]["quest"])
             for c in cases]

    def attend_all():
        return [sparse_decode(c["q"], c["kv"][0], c["kv"][1], c["table"], c["lens"], *sel, out=out,
                              plan=decode_plan) for c, sel in zip(cases, lists)]

    reference = naive_sparse_decode(first["q"], first["kv"][0], first["kv"][1], first["table"], first["lens"],
                                    *lists[0])
    rows = []
    for tile in SPLITS_TILES:
        got = with_splits_tile(tile, lambda: sparse_decode(first["q"], first["kv"][0], first["kv"][1],
                                                           first["table"], first["lens"], *lists[0],
                                                           plan=decode_plan))
        check(f"{shape} splits tile {tile}", got, reference)
        ms = with_splits_tile(tile, lambda: median_ms(attend_all))["cuda_graph"] / LAYERS
        kernels = with_splits_tile(tile, lambda: kernel_times(graph_of(attend_all)))
        rows.append(row("attend", f"ucm_splits_tile{tile}", shape, ms, mode="cuda_graph", layers=LAYERS,
                        num_splits=decode_plan.num_splits,
                        kernels_us_per_layer={k: round(v / LAYERS, 2) for k, v in kernels.items()}))
    for impl, step in dense_steps(cases, out).items():
        rows.append(row("decode_dense", impl, shape, median_ms(step)["cuda_graph"] / LAYERS, mode="cuda_graph",
                        layers=LAYERS))
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    ceilings = measure_copy_ceilings()
    cases = [inputs(1, 131072, 0) for _ in range(LAYERS)]
    rows = []
    for selection, sizes in SELECTIONS.items():
        rows += layered_attend_rows(cases, selection, sizes)
        path = write_results("attend_ab", rows, ceilings, extra={
            "sizes": SELECTIONS, "timing": "CUDA-graph replay of 8 layers, do_bench median, L2 cleared, per layer"})
    print(path)


if __name__ == "__main__":
    main()
