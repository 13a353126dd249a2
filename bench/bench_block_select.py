"""Quick H100 timing of block_select (and one decode step of block_repr) at the GSA bench shapes."""
import torch
from bench.harness import cuda_median_ms, measure_copy_ceilings, row, write_results
from ucm_kernels.block_repr import empty_block_repr, update_block_repr
from ucm_kernels.block_select import naive_block_scores, naive_select_blocks, select_blocks

BS, KVH, QH, D = 16, 8, 32, 128
MODES = {"ratio0.3": {}, "budget2048": {"token_budget": 2048}}


def chosen_scores(scores, sel_idx):
    picked = scores.gather(-1, sel_idx.clamp(min=0).long()).masked_fill(sel_idx < 0, float("-inf"))
    return picked.sort(-1).values


def check(q, reprs, bt, sl, sel, args):
    """Kernel picks the same multiset of scores as the torch reference (ties allowed)."""
    ref = naive_select_blocks(q, *reprs, bt, sl, **args)
    assert torch.equal(sel[1], ref[1])
    scores = naive_block_scores(q, *reprs, bt, sl, block_size=BS, score=args["score"])
    torch.testing.assert_close(chosen_scores(scores, sel[0]), chosen_scores(scores, ref[0]), atol=1e-3, rtol=1e-4)


def main():
    ceilings = measure_copy_ceilings()
    hbm = ceilings["hbm_copy_gbps"]
    rows = []
    for batch in (1, 8, 32):
        for ctx in (32768, 131072):
            nb = ctx // BS
            key_cache = torch.randn(batch * nb, BS, KVH, D, device="cuda", dtype=torch.bfloat16)
            reprs = empty_block_repr(key_cache)
            update_block_repr(key_cache, torch.arange(batch * nb, device="cuda"), *reprs)
            step_ids = torch.randint(0, batch * nb, (batch,), device="cuda", dtype=torch.int32)
            ms = cuda_median_ms(lambda: update_block_repr(key_cache, step_ids, *reprs), iters=50)
            rows.append(row("block_repr_decode_step", "ucm", f"b{batch}_ctx{ctx}", ms))
            bt = torch.randperm(batch * nb, device="cuda").to(torch.int32).view(batch, nb)
            sl = torch.full((batch,), ctx - 5, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, QH, D, device="cuda", dtype=torch.bfloat16)
            for mode, extra in MODES.items():
                for score in ("quest", "mean"):
                    args = dict(block_size=BS, sparse_ratio=0.3, init_window=1, local_window=4, min_blocks=8,
                                score=score, **extra)
                    sel = select_blocks(q, *reprs, bt, sl, **args)
                    if batch == 1:
                        check(q, reprs, bt, sl, sel, args)
                    ms = cuda_median_ms(lambda: select_blocks(q, *reprs, bt, sl, **args), iters=50)
                    nbytes = batch * KVH * nb * D * 2 * (2 if score == "quest" else 1)
                    rows.append(row(f"select_{mode}_{score}", "ucm", f"b{batch}_ctx{ctx}", ms, nbytes, hbm))
            del key_cache, reprs
    path = write_results("block_select", rows, ceilings)
    for r in rows:
        print(f"{r['name']:28s} {r['shape']:14s} {r['median_ms']:9.4f} ms {r.get('pct_of_ceiling', '')}")
    print(path)


if __name__ == "__main__":
    main()
