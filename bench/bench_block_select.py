"""GPU timing of block_select (and one decode step of block_repr) at the GSA bench shapes.

Selection runs as a decode step runs it: ``plan_select`` once, ``plan.run`` timed; rules as in
``bench_sparse_decode`` (``quest`` and ``mean`` on bf16 reprs, ``quest_fp8`` on fp8 reprs with their scales) and
``gauss`` (Quest's bf16 reprs, a log-mass row per query head and softmax shares in the top-k program).
Each figure is timed in two modes (see ``bench_sparse_decode``): ``cuda_graph`` (replay of the captured call:
GPU time) and ``eager`` (the Python call, host launch work included); do_bench medians with the L2 cleared
before every call; gauss also at half its score tile (:func:`score_tile_variants`). ``--warps``: a sweep of the
top-k program's warps instead (sweep_select_warps).
"""
import dataclasses
import sys

import torch

from bench.bench_sparse_decode import FP8, MODES, RULES, median_ms
from bench.harness import measure_copy_ceilings, row, write_results
from ucm_kernels.block_repr import empty_block_repr, update_block_repr
from ucm_kernels.block_select import naive_block_scores, naive_select_blocks, plan_select

BS, KVH, QH, D = 16, 8, 32, 128
BATCHES, CONTEXTS = (1, 8, 32), (32768, 131072)
MODES_SEL = {"ratio0.3": {}, "budget2048": {"token_budget": 2048}}
SELECT_RULES = {**RULES, "gauss": "gauss"}  # rule -> score


def chosen_scores(scores, sel_idx):
    picked = scores.gather(-1, sel_idx.clamp(min=0).long()).masked_fill(sel_idx < 0, float("-inf"))
    return picked.sort(-1).values


def check(q, reprs, bt, sl, sel, args):
    """Kernel picks the same multiset of scores as the torch reference on the same reprs (ties allowed)."""
    ref = naive_select_blocks(q, block_table=bt, seq_lens=sl, **reprs, **args)
    assert torch.equal(sel[1], ref[1])
    scores = naive_block_scores(q, block_table=bt, seq_lens=sl, block_size=BS, score=args["score"], **reprs)
    torch.testing.assert_close(chosen_scores(scores, sel[0]), chosen_scores(scores, ref[0]), atol=1e-3, rtol=1e-4)


def selected_repr_bytes(reprs: dict, score: str, blocks: int) -> int:
    """Bytes one selection reads: kmin + kmax (Quest) or kmean of every block and head, plus fp8 scales."""
    per_head = D * reprs["kmin"].element_size() * (1 if score == "mean" else 2)
    per_head += reprs["kscale"].element_size() if "kscale" in reprs else 0
    return blocks * KVH * per_head


def score_tile_variants(plan, score: str) -> dict:
    """{impl: plan}: the plan as made ("ucm"); for gauss also with half its score tile ("ucm_half_tile"): compiled
    for sm_90 at 8 KV heads x 128 dims, the gauss score kernel spills at the planned 8-block tile (255 registers +
    88 B of stack) and not at 4 (168), which only a timing can weigh against the extra programs."""
    variants = {"ucm": plan}
    if score == "gauss" and plan.score_tile > 1:
        variants["ucm_half_tile"] = dataclasses.replace(plan, score_tile=plan.score_tile // 2)
    return variants


def save(rows: list[dict], ceilings: dict):
    """Write the results so far under $OUT (or bench/results/); return the path."""
    return write_results("block_select", rows, ceilings, extra={
        "timing": "do_bench median, L2 cleared before every call; cuda_graph: replay of the captured call, "
                  "eager: the Python call (plan made once, outside the timed call)",
        "rules": {rule: score + (" on float8_e4m3fn reprs + fp32 kscale" if rule.endswith("_fp8") else " on bf16 reprs")
                  for rule, score in SELECT_RULES.items()}})


def main():
    ceilings = measure_copy_ceilings()
    hbm = ceilings["hbm_copy_gbps"]
    rows = []
    for batch in BATCHES:
        for ctx in CONTEXTS:
            nb = ctx // BS
            shape = f"b{batch}_ctx{ctx}"
            key_cache = torch.randn(batch * nb, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
            all_ids = torch.arange(batch * nb, device="cuda")
            step_ids = torch.randint(0, batch * nb, (batch,), device="cuda", dtype=torch.int32)
            reprs = {}
            for impl, dtype in (("ucm", None), ("ucm_fp8", FP8)):
                found = empty_block_repr(key_cache, dtype)
                update_block_repr(key_cache, all_ids, *found)
                reprs[dtype] = dict(zip(("kmin", "kmax", "kmean", "kscale"), found))
                times = median_ms(lambda: update_block_repr(key_cache, step_ids, *found))
                rows += [row("block_repr_decode_step", impl, shape, times[mode], mode=mode) for mode in MODES]
            bt = torch.randperm(batch * nb, device="cuda").to(torch.int32).view(batch, nb)
            sl = torch.full((batch,), ctx - 5, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, QH, D, device="cuda", dtype=torch.bfloat16)
            for mode_name, extra in MODES_SEL.items():
                for rule, score in SELECT_RULES.items():
                    rule_reprs = reprs[FP8 if rule.endswith("_fp8") else None]
                    args = dict(block_size=BS, sparse_ratio=0.3, init_window=1, local_window=4, min_blocks=8,
                                score=score, **extra)
                    plan = plan_select(batch, KVH, D, nb, **args, device="cuda", num_q_heads=QH)
                    nbytes = batch * selected_repr_bytes(rule_reprs, score, nb)
                    for impl, variant in score_tile_variants(plan, score).items():
                        got = variant.run(q, block_table=bt, seq_lens=sl, **rule_reprs)
                        if batch == 1:
                            check(q, rule_reprs, bt, sl, got, args)
                        times = median_ms(lambda: variant.run(q, block_table=bt, seq_lens=sl, out=got, **rule_reprs))
                        rows += [row(f"select_{mode_name}_{rule}", impl, shape, times[mode], nbytes, hbm, mode=mode,
                                     score_tile=variant.score_tile) for mode in MODES]
            key_cache = reprs = None  # freed before the next shape (the timed lambdas are done)
            torch.cuda.empty_cache()
            path = save(rows, ceilings)  # after every shape: a run cut short keeps its finished shapes
    for r in rows:
        print(f"{r['name']:30s} {r['impl']:8s} {r['shape']:14s} {r['mode']:11s} {r['median_ms']:9.4f} ms "
              f"{r.get('gbps', ''):>9} GB/s {r.get('pct_of_ceiling', '')}")
    print(path)



def sweep_select_warps() -> None:
    """Warps of the top-k program (``SelectPlan.select_warps``) against the plan's choice, at batch 1 and 8 with
    128K-token rows and rows a few blocks longer (their table width rounds up to twice the row registers)."""
    ceilings = measure_copy_ceilings()
    rows = []
    for batch in (1, 8):
        for nb in (8192, 8195):
            key_cache = torch.randn(batch * nb, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
            found = empty_block_repr(key_cache)
            update_block_repr(key_cache, torch.arange(batch * nb, device="cuda"), *found)
            reprs = dict(zip(("kmin", "kmax", "kmean"), found))
            bt = torch.randperm(batch * nb, device="cuda").to(torch.int32).view(batch, nb)
            sl = torch.full((batch,), nb * BS - 5, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, QH, D, device="cuda", dtype=torch.bfloat16)
            plan = plan_select(batch, KVH, D, nb, block_size=BS, sparse_ratio=0.3, init_window=1, local_window=4,
                               min_blocks=8, device="cuda")
            expected = plan.run(q, block_table=bt, seq_lens=sl, **reprs)
            for warps in (4, 8, 16, 32):
                warped = dataclasses.replace(plan, select_warps=warps)
                got = warped.run(q, block_table=bt, seq_lens=sl, **reprs)
                assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
                ms = median_ms(lambda: warped.run(q, block_table=bt, seq_lens=sl, out=got, **reprs))["cuda_graph"]
                rows.append(row("select_ratio0.3_quest", f"warps{warps}", f"b{batch}_blocks{nb}", ms,
                                planned=warps == plan.select_warps))
                print(rows[-1], flush=True)
            key_cache = found = reprs = None  # freed before the next shape
            torch.cuda.empty_cache()
    print(write_results("select_warps_sweep", rows, ceilings))


if __name__ == "__main__":
    sweep_select_warps() if "--warps" in sys.argv else main()
