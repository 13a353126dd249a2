"""The list attention at 1 x 128K per layer of an 8-layer CUDA graph, by list length, with the combine merging 16,
32 or 64 splits a loop step (``sparse_decode.triton._SPLITS_TILE``), beside the dense decodes of the same graphs.

Two questions. At batch 1 a 30% list runs as 62 splits a KV head, which the combine merged in four loop steps of
16 from 4563cb3 to 27fbfa8 (one step of 64 before and since): what does the step cost a layer? And how does a
layer's time grow with the list (token budgets of 2K to 64K and sparse_ratio 0.3): a fixed part and a byte rate,
which of them keeps the lists at batch 1 under dense decode's rate? Each layer of the graph has its own KV, query
and Quest lists (``sliced_topk_ab.inputs``); every tile setting's output is checked against the loop reference on
the last layer before anything is timed. Timed: CUDA-graph replay of the 8 layers, do_bench median, L2 cleared,
per layer; and each kernel's device time per layer (torch.profiler over replays).

    python -m bench.attend_ab     # JSON under $OUT or bench/results/
"""

import torch

from bench.bench_sparse_decode import BLOCK_SIZE, HEAD_DIM, NUM_KV_HEADS, check, graph_of, median_ms
from bench.harness import measure_copy_ceilings, row, settings_changed, write_results
from bench.profile_gsa_kernels import kernel_times
from bench.sliced_topk_ab import LAYERS, SIZES, dense_steps, inputs
from ucm_kernels.block_select import plan_select, selection_width
from ucm_kernels.sparse_decode import plan_decode, sparse_decode
from ucm_kernels.sparse_decode import triton as sparse_decode_triton
from ucm_kernels.sparse_decode.naive import naive_sparse_decode

SELECTIONS = {"budget2048": SIZES, "budget8192": {**SIZES, "token_budget": 8192},
              "budget32768": {**SIZES, "token_budget": 32768}, "ratio0.3": {**SIZES, "token_budget": None},
              "budget65536": {**SIZES, "token_budget": 65536}}
SPLITS_TILES = (16, 32, 64)
TILE_AB = ("budget2048", "ratio0.3")  # the selections timed at every splits tile (the others at the planned one)


def splits_tile(tile: int):
    """Within: the combine merges ``tile`` splits a loop step."""
    return settings_changed(sparse_decode_triton, _SPLITS_TILE=tile)


def layered_attend_rows(cases: list[dict], selection: str, sizes: dict, ceiling_gbps: float) -> list[dict]:
    """Per-layer rows of attention over each layer's Quest lists of ``sizes``, at every splits tile for the
    selections of TILE_AB (else the planned one), with the KV bytes the lists name (GB/s against the read
    ceiling)."""
    first, blocks = cases[0], cases[0]["blocks"]
    shape = f"b1_ctx{blocks * BLOCK_SIZE}_{selection}_L{LAYERS}"
    out = torch.empty_like(first["q"])
    decode_plan = plan_decode(first["q"], first["kv"][0], selection_width(blocks, **sizes))
    select_plan = plan_select(1, NUM_KV_HEADS, HEAD_DIM, blocks, **sizes, device="cuda")
    lists = [tuple(t.clone() for t in select_plan.run(c["q"], block_table=c["table"], seq_lens=c["lens"],
                                                      **c["reprs"]["quest"])) for c in cases]
    listed_blocks = sum(int(sel_count.sum()) for _, sel_count in lists) / LAYERS
    nbytes = int(listed_blocks * 2 * BLOCK_SIZE * HEAD_DIM * first["q"].element_size())

    def attend_all():
        return [sparse_decode(c["q"], c["kv"][0], c["kv"][1], c["table"], c["lens"], *sel, out=out,
                              plan=decode_plan) for c, sel in zip(cases, lists)]

    last = cases[-1]  # the layers share ``out``: after a step it holds the last layer's output
    reference = naive_sparse_decode(last["q"], last["kv"][0], last["kv"][1], last["table"], last["lens"], *lists[-1])
    rows = []
    for tile in SPLITS_TILES if selection in TILE_AB else (sparse_decode_triton._SPLITS_TILE,):
        with splits_tile(tile):
            check(f"{shape} splits tile {tile}", attend_all()[-1], reference)
            ms = median_ms(attend_all)["cuda_graph"] / LAYERS
            kernels = kernel_times(graph_of(attend_all))
        rows.append(row("attend", f"ucm_splits_tile{tile}", shape, ms, nbytes, ceiling_gbps, mode="cuda_graph",
                        layers=LAYERS, listed_blocks_per_layer=listed_blocks, num_splits=decode_plan.num_splits,
                        kernels_us_per_layer={k: round(v / LAYERS, 2) for k, v in kernels.items()}))
        print(rows[-1], flush=True)
    return rows


def dense_rows(cases: list[dict]) -> list[dict]:
    """Per-layer rows of the dense decodes (SDPA, ours, FlashInfer's when it imports) of the same 8 layers."""
    shape = f"b1_ctx{cases[0]['blocks'] * BLOCK_SIZE}_L{LAYERS}"
    out = torch.empty_like(cases[0]["q"])
    rows = [row("decode_dense", impl, shape, median_ms(step)["cuda_graph"] / LAYERS, mode="cuda_graph",
                layers=LAYERS) for impl, step in dense_steps(cases, out).items()]
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    ceilings = measure_copy_ceilings()
    cases = [inputs(1, 131072, 0) for _ in range(LAYERS)]
    rows = dense_rows(cases)
    for selection, sizes in SELECTIONS.items():
        rows += layered_attend_rows(cases, selection, sizes, ceilings["hbm_read_gbps"])
        path = write_results("attend_ab", rows, ceilings, extra={
            "sizes": SELECTIONS, "timing": "CUDA-graph replay of 8 layers, do_bench median, L2 cleared, per layer"})
    print(path)


if __name__ == "__main__":
    main()
