"""The sliced top-k against one program a row, in one process: selection at a 2048-token budget planned both ways.

For each shape (1 x 128K, 1 x 128K + 96 tokens, 8 x 128K, 32 x 32K; 32 query / 8 KV heads of 128, bf16, blocks of
16) and each Quest rule (bf16 and fp8 reprs), the same settings planned both ways (``sliced.MIN_PRUNE`` raised
past any slice for one program a row, the one-wave limit lifted for slices; rows say which one ``plan_select``
picks). Their lists must be equal bit for bit before anything is timed. Timed (CUDA-graph replay and eager,
do_bench median, L2 cleared before every call): the selection alone (and its device time by kernel, Quest on bf16
reprs), selection + attention, attention alone (the step that reuses its lists), and the dense decodes of the same
run (SDPA, ours, and FlashInfer's two paged kernels when it imports: carry .flashinfer, ENV.md), the fastest of
which every speedup is read against. ``select_every 8`` is composed as ``(select_attend + 7 x attend) / 8`` (GSA's
reusing step for named requests is its attention alone). At 1 x 128K the same figures are also taken per layer from
one graph of LAYERS layers (``layered_rows``), as a serving engine replays a step, at the budget and at sparse_ratio
0.3, with the reusing step as each path launches it (:data:`REUSING_STEPS`: attention alone, with ``inputs_ready``,
after vLLM's empty selection, after the drift rule's check and that selection), composed for each of
:data:`SELECT_EVERY` as ``(select_attend + (N - 1) x reusing step) / N``.

    python -m bench.sliced_topk_ab [--layered]     # JSON under $OUT or bench/results/
"""
import itertools
import sys

import torch
import torch.nn.functional as F

from bench import flashinfer_peer
from bench.bench_sparse_decode import BLOCK_SIZE, FP8, HEAD_DIM, NUM_KV_HEADS, NUM_Q_HEADS, graph_of, median_ms
from bench.harness import measure_copy_ceilings, row, settings_changed, write_results
from bench.profile_gsa_kernels import kernel_times
from ucm_kernels.block_repr import empty_block_repr, update_block_repr
from ucm_kernels.block_select import plan_select, selection_width
from ucm_kernels.block_select import sliced
from ucm_kernels.query_drift import query_drift
from ucm_kernels.block_select import triton as block_select_triton
from ucm_kernels.sparse_decode import dense_decode, plan_decode, sparse_decode

SIZES = dict(block_size=BLOCK_SIZE, sparse_ratio=0.3, init_window=1, local_window=4, min_blocks=8, token_budget=2048)
FLASHINFER = flashinfer_peer.available()
LAYERS = 8  # layers in one graph for the per-layer figures of a whole step (layered_rows)
SHAPES = ((1, 131072, 0), (1, 131072, 96), (8, 131072, 0), (32, 32768, 0))  # batch, context, tokens past it
SELECT_EVERY = (8, 16)  # the select_every settings composed in the layered figures (their quality: tuning.md 5.1.2)
DRIFT = 0.1  # the drift rule's threshold in the layered figures (no row's queries move there)
# select_every 8's reusing step in the layered figures, by row suffix: attention alone (GSA for named requests), with
# inputs_ready (GSA reading kept lists in place), after the selection launched with no row to reselect (vLLM's flash
# step), and after the drift rule's launch and that selection (select_drift set; no row drifts)
REUSING_STEPS = {"": "attend_{}", "_ready": "attend_{}_ready", "_masked": "masked_attend_{}",
                 "_drift": "drift_attend_{}"}


def inputs(batch: int, context: int, extra: int) -> dict:
    """Paged K/V with shuffled blocks for ``context + extra`` tokens a request, its table, the contiguous K/V SDPA
    reads, and the bf16 and fp8 reprs of every block."""
    blocks = -(-(context + extra) // BLOCK_SIZE)
    kv = torch.randn(2, batch * blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(batch * blocks, device="cuda").view(batch, blocks).int()
    lens = torch.full((batch,), context + extra, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    dense_kv = [kv[i][table.long()].flatten(1, 2)[:, :context + extra].transpose(1, 2).contiguous() for i in range(2)]
    reprs = {}
    for rule, dtype in (("quest", None), ("quest_fp8", FP8)):
        found = empty_block_repr(kv[0], dtype)
        update_block_repr(kv[0], table.flatten(), *found)
        reprs[rule] = dict(zip(("kmin", "kmax", "kmean", "kscale"), found))
    return dict(q=q, kv=kv, table=table, lens=lens, dense_kv=dense_kv, reprs=reprs, blocks=blocks)


def dense_steps(cases: list[dict], out: torch.Tensor) -> dict:
    """{impl: launch} of the dense decodes over every layer of ``cases`` (one each, as ``inputs`` made them): SDPA
    over the contiguous K/V, ours, and FlashInfer's two paged kernels when it imports (the peer)."""
    first = cases[0]
    plan = plan_decode(first["q"], first["kv"][0], first["blocks"], dense=True)
    steps = {
        "sdpa": lambda: [F.scaled_dot_product_attention(c["q"][:, :, None], *c["dense_kv"], enable_gqa=True)
                         for c in cases],
        "ucm_dense_decode": lambda: [dense_decode(c["q"], c["kv"][0], c["kv"][1], c["table"], c["lens"], out=out,
                                                  plan=plan) for c in cases],
    }
    if FLASHINFER:
        shape = dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, page_size=BLOCK_SIZE,
                     dtype=torch.bfloat16)
        peers = [flashinfer_peer.dense_decoders(c["table"], c["lens"], **shape) for c in cases]
        for impl in flashinfer_peer.KERNELS:
            steps[impl] = lambda impl=impl: [p[impl].run(c["q"], c["kv"][0], c["kv"][1], out=out)
                                             for p, c in zip(peers, cases)]
    return steps


def plans(batch: int, blocks: int) -> tuple[dict, str]:
    """({"sliced": ..., "one_program": ...}, the one ``plan_select`` picks): the same settings planned with the
    slices' one-wave limit lifted and with slicing off."""
    planned = "sliced" if plan_select(batch, NUM_KV_HEADS, HEAD_DIM, blocks, **SIZES, device="cuda").slices else \
        "one_program"
    made = {}
    for name, changed in (("sliced", settings_changed(block_select_triton, sm_count=lambda device: 1 << 30)),
                          ("one_program", settings_changed(sliced, MIN_PRUNE=1 << 30))):
        with changed:
            made[name] = plan_select(batch, NUM_KV_HEADS, HEAD_DIM, blocks, **SIZES, device="cuda")
    assert made["sliced"].slices > 0 and made["one_program"].slices == 0
    return made, planned


def shape_rows(batch: int, context: int, extra: int) -> list[dict]:
    case = inputs(batch, context, extra)
    q, kv, table, lens = case["q"], case["kv"], case["table"], case["lens"]
    shape = f"b{batch}_ctx{context + extra}_budget2048"
    out = torch.empty_like(q)
    decode_plan = plan_decode(q, kv[0], selection_width(case["blocks"], **SIZES))
    dense = {impl: median_ms(step) for impl, step in dense_steps([case], out).items()}
    rows = [row("decode_dense", impl, shape, ms[mode], mode=mode) for impl, ms in dense.items() for mode in ms]
    best = {mode: min(ms[mode] for ms in dense.values()) for mode in ("cuda_graph", "eager")}

    def attend(sel):
        return sparse_decode(q, kv[0], kv[1], table, lens, *sel, out=out, plan=decode_plan)

    for rule, reprs in case["reprs"].items():
        made, planned = plans(batch, case["blocks"])
        lists = {name: plan.run(q, block_table=table, seq_lens=lens, **reprs) for name, plan in made.items()}
        for name in made:
            for i, what in enumerate(("sel_idx", "sel_count")):
                assert torch.equal(lists[name][i], lists["one_program"][i]), f"{shape} {rule} {name}: {what} differ"
        alone = median_ms(lambda: attend(lists["sliced"]))
        rows += [row("attend", f"ucm_{rule}", shape, alone[mode], mode=mode) for mode in alone]
        for name, plan in made.items():
            kept = tuple(t.clone() for t in lists[name])

            def select(plan=plan, kept=kept):
                return plan.run(q, block_table=table, seq_lens=lens, out=kept, **reprs)

            times = {"select": median_ms(select), "select_attend": median_ms(lambda: attend(select()))}
            extra = dict(slices=plan.slices, planned=name == planned)
            if rule == "quest":  # device time by kernel of the selection (torch.profiler over graph replays)
                extra["kernels_us"] = kernel_times(graph_of(select))
            for mode in ("cuda_graph", "eager"):
                both = times["select_attend"][mode]
                every8 = (both + 7 * alone[mode]) / 8
                rows += [row("select", f"ucm_{rule}_{name}", shape, times["select"][mode], mode=mode, **extra),
                         row("select_attend", f"ucm_{rule}_{name}", shape, both, mode=mode,
                             speedup_vs_best_dense=best[mode] / both, **extra),
                         row("select_attend_every8", f"ucm_{rule}_{name}", shape, every8, mode=mode,
                             speedup_vs_best_dense=best[mode] / every8, composed="(select_attend + 7 x attend) / 8",
                             **extra)]
    return rows


def layered_rows(batch: int, context: int, sizes: dict, selection: str) -> list[dict]:
    """Per layer from one CUDA graph of LAYERS layers, each with its own KV, reprs and query as a model's layers
    have (a serving engine replays a whole step, so a graph's launch is paid once for all of them): the dense decodes
    of :func:`dense_steps`, attention alone over each layer's Quest lists (also with ``inputs_ready``, as a reusing
    step may launch it: lists from an earlier step), select + attend as planned (bf16 and fp8 reprs), and the
    reusing steps of :data:`REUSING_STEPS`, with selection ``sizes`` (named ``selection`` in the rows)."""
    cases = [inputs(batch, context, 0) for _ in range(LAYERS)]
    first, blocks = cases[0], cases[0]["blocks"]
    shape = f"b{batch}_ctx{context}_{selection}_L{LAYERS}"
    out = torch.empty_like(first["q"])
    decode_plan = plan_decode(first["q"], first["kv"][0], selection_width(blocks, **sizes))
    select_plan = plan_select(batch, NUM_KV_HEADS, HEAD_DIM, blocks, **sizes, device="cuda")

    def attend(c, sel, ready=False):
        return sparse_decode(c["q"], c["kv"][0], c["kv"][1], c["table"], c["lens"], *sel, out=out, plan=decode_plan,
                             inputs_ready=ready)

    def select(c, rule, kept, reselect=None):
        return select_plan.run(c["q"], block_table=c["table"], seq_lens=c["lens"], out=kept, reselect=reselect,
                               **c["reprs"][rule])

    slots = torch.arange(batch, device="cuda")
    keep_all, mask = torch.zeros(batch, dtype=torch.int32, device="cuda"), torch.empty_like(slots, dtype=torch.int32)
    kept_q = [c["q"].clone() for c in cases]  # the queries each layer's lists were selected with: no row drifts

    def drifted(c, queries):  # the drift rule's launch at a step the reuse rule keeps every row
        return query_drift(c["q"], queries, slots, keep_all, threshold=DRIFT, out=mask)

    dense = dense_steps(cases, out)
    steps = dict(dense)
    for rule in ("quest", "quest_fp8"):
        kept = [tuple(t.clone() for t in select(c, rule, None)) for c in cases]
        plain = attend(cases[-1], kept[-1]).clone()
        assert torch.equal(attend(cases[-1], kept[-1], True), plain), f"{rule}: inputs_ready changed the output"
        steps[f"attend_{rule}"] = lambda kept=kept: [attend(c, sel) for c, sel in zip(cases, kept)]
        steps[f"attend_{rule}_ready"] = lambda kept=kept: [attend(c, sel, True) for c, sel in zip(cases, kept)]
        steps[f"select_attend_{rule}"] = lambda rule=rule, kept=kept: [
            attend(c, select(c, rule, sel)) for c, sel in zip(cases, kept)]
        steps[f"masked_attend_{rule}"] = lambda rule=rule, kept=kept: [  # vLLM's reusing step: no row reselects
            attend(c, select(c, rule, sel, keep_all)) for c, sel in zip(cases, kept)]
        steps[f"drift_attend_{rule}"] = lambda rule=rule, kept=kept: [  # with the drift rule: no row drifts
            attend(c, select(c, rule, sel, drifted(c, q))) for c, sel, q in zip(cases, kept, kept_q)]
    drifted(cases[0], kept_q[0])
    assert not mask.any(), "the drift rule reselected rows whose queries did not move"
    times = {name: {mode: ms / LAYERS for mode, ms in median_ms(step).items()} for name, step in steps.items()}
    best = {mode: min(times[impl][mode] for impl in dense) for mode in ("cuda_graph", "eager")}
    rows = [row(name, "per_layer", shape, ms[mode], mode=mode, layers=LAYERS, slices=select_plan.slices)
            for name, ms in times.items() for mode in ms]
    for rule, reuse, every in itertools.product(("quest", "quest_fp8"), REUSING_STEPS, SELECT_EVERY):
        reusing = REUSING_STEPS[reuse].format(rule)
        for mode in ("cuda_graph", "eager"):
            per_step = (times[f"select_attend_{rule}"][mode] + (every - 1) * times[reusing][mode]) / every
            rows.append(row(f"select_attend_every{every}_{rule}{reuse}", "per_layer", shape, per_step, mode=mode,
                            layers=LAYERS, speedup_vs_best_dense=best[mode] / per_step,
                            composed=f"(select_attend + {every - 1} x {reusing}) / {every}"))
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    """All figures; with ``--layered`` only the per-layer figures of LAYERS layers in one graph."""
    ceilings = measure_copy_ceilings()
    layered = "--layered" in sys.argv[1:]
    rows = []
    for batch, context, extra in SHAPES:
        if not layered:
            rows += shape_rows(batch, context, extra)
        if (batch, extra) == (1, 0):
            rows += layered_rows(batch, context, SIZES, "budget2048")
            rows += layered_rows(batch, context, {**SIZES, "token_budget": None}, "ratio0.3")
        torch.cuda.empty_cache()
        path = write_results("sliced_topk_ab", rows, ceilings, extra={
            "sizes": SIZES, "flashinfer": FLASHINFER or "not installed: no FlashInfer rows",
            "timing": "do_bench median, L2 cleared before every call; cuda_graph: replay of the captured call, "
            "eager: the Python call"})
    for r in rows:
        if r["mode"] == "cuda_graph":
            print(f"{r['name']:22s} {r['impl']:30s} {r['shape']:30s} {r['median_ms'] * 1000:8.1f} us "
                  f"{r.get('speedup_vs_best_dense', '')} {'planned' if r.get('planned') else ''}")
    print(path)


if __name__ == "__main__":
    main()
