"""Two-stage GSA selection on the GPU (``GSAConfig.rerank_candidates`` C): its parts beside Quest and dense decode.

bf16, 32 query / 8 KV heads, head_dim 128, block 16, Quest at sparse_ratio 0.3 (windows: init 1, local 4, min 8
blocks), 1 and 8 requests of 128K tokens, random data, physical blocks shuffled. Per shape and C (2, 3): the first
stage (Quest at C x 0.3), the second stage's kernel (``ucm_kernels.block_mass``: the candidates' keys read once),
the choice among the candidates (the select kernel's top-k over the masses; its torch twin beside it), the whole
two-stage selection as ``ucm_sparse.ops.select`` runs it, and attention over its lists; against Quest's one-stage
select + attend and our dense decode (within 1% of FlashInfer's, ``bench/dense_spread.py``). Figures are CUDA-graph
replays (``eager_ms``: the Python call), do_bench medians with the L2 cleared before each call. Before timing, the
Triton lists are checked against the torch backend's (same inputs, torch ops on the GPU): at least 99% of the kept
blocks agree (the kernel's bf16 dot and the torch fp32 matmul may order a near tie differently).

Usage (lent GPU): ``python -m bench.bench_rerank``; JSON under $OUT or bench/results/.
"""
import torch

from bench.bench_sparse_decode import median_ms, paged_inputs
from bench.harness import row, run_shapes
from ucm_kernels.block_mass import block_lse2
from ucm_kernels.block_repr import empty_block_repr, update_block_repr
from ucm_kernels.block_select import plan_select
from ucm_kernels.sparse_decode import dense_decode, plan_decode, sparse_decode
from ucm_sparse import GSAConfig, ops

SHAPES = [(8, 131072), (1, 131072)]
CANDIDATES = (2.0, 3.0)
BLOCK = 16
CONFIG = dict(sparse_ratio=0.3, init_window_sz=1, local_window_sz=4, min_blocks=8)


def graph_ms(fn) -> float:
    return median_ms(fn)["cuda_graph"]


def agreement(a: ops.Selection, b: ops.Selection) -> float:
    """Share of a's listed blocks that b lists too (same row)."""
    listed = torch.arange(a.sel_idx.shape[2], device=a.sel_idx.device) < a.sel_count[..., None]
    found = (a.sel_idx[..., :, None] == b.sel_idx[..., None, :]).any(-1) & listed
    return float(found.sum() / listed.sum())


def shape_rows(batch: int, context: int) -> list[dict]:
    q, kv, table, seq_lens, _, _ = paged_inputs(batch, context)
    reprs = empty_block_repr(kv[0])
    update_block_repr(kv[0], table.flatten(), *reprs)
    blocks, shape = context // BLOCK, f"b{batch}_ctx{context}"
    out = torch.empty_like(q)
    dense_plan = plan_decode(q, kv[0], blocks, dense=True)
    times = {"dense": graph_ms(lambda: dense_decode(q, kv[0], kv[1], table, seq_lens, out=out, plan=dense_plan))}
    sizes = ops.select_sizes(GSAConfig(**CONFIG), BLOCK)
    one = plan_select(batch, 8, 128, blocks, **sizes, device="cuda")
    lists = one.run(q, *reprs, table, seq_lens)
    attend_plan = plan_decode(q, kv[0], lists[0].shape[2])

    def attend(sel_idx, sel_count):
        return sparse_decode(q, kv[0], kv[1], table, seq_lens, sel_idx, sel_count, out=out, plan=attend_plan)

    times["quest_select_attend"] = graph_ms(lambda: (one.run(q, *reprs, table, seq_lens, out=lists), attend(*lists)))
    times["attend"] = graph_ms(lambda: attend(*lists))
    rows = [row("rerank", impl, shape, ms, speedup_vs_dense=round(times["dense"] / ms, 3))
            for impl, ms in times.items()]
    for factor in CANDIDATES:
        config = GSAConfig(**CONFIG, rerank_candidates=factor)
        wide = plan_select(batch, 8, 128, blocks, **dict(sizes, sparse_ratio=0.3 * factor), device="cuda")
        candidates = ops.Selection(*wide.run(q, *reprs, table, seq_lens))
        mass = ops.block_mass(q, kv[0], table, seq_lens, candidates)

        def two_stage():
            return ops.select("triton", q, reprs, table, seq_lens, config, BLOCK, key_cache=kv[0])

        def attend_lists(selection: ops.Selection):
            return attend(selection.sel_idx, selection.sel_count)

        chosen = two_stage()
        torch_chosen = ops.select("torch", q, reprs, table, seq_lens, config, BLOCK, key_cache=kv[0])
        agree = agreement(chosen, torch_chosen)
        if agree < 0.99:
            raise AssertionError(f"{shape} C={factor}: Triton two-stage lists agree {agree:.4f} with the torch ones")
        parts = {"first_stage": median_ms(lambda: wide.run(q, *reprs, table, seq_lens, out=(
                     candidates.sel_idx, candidates.sel_count))),
                 "block_mass_kernel": median_ms(lambda: block_lse2(q, kv[0], table, seq_lens, candidates.sel_idx,
                                                                   candidates.sel_count)),
                 "keep_most_mass": median_ms(lambda: ops.keep_most_mass("triton", candidates, mass, table,
                                                                         seq_lens, config, BLOCK)),
                 "keep_most_mass_torch": median_ms(lambda: ops.keep_most_mass("torch", candidates, mass, table,
                                                                               seq_lens, config, BLOCK)),
                 "two_stage_select": median_ms(two_stage),
                 "two_stage_select_attend": median_ms(lambda: attend_lists(two_stage()))}
        for impl, ms in parts.items():
            rows.append(row("rerank", impl, shape, ms["cuda_graph"], eager_ms=round(ms["eager"], 5),
                            candidates=factor, lists_agree_with_torch=round(agree, 5),
                            speedup_vs_dense=round(times["dense"] / ms["cuda_graph"], 3)))
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    run_shapes("rerank", SHAPES, shape_rows, extra={"gsa": CONFIG, "block_size": BLOCK})


if __name__ == "__main__":
    main()
