"""The radix top-k against one program a row, in one process: selection at sparse_ratio 0.3 planned both ways.

The radix top-k (``ucm_kernels/block_select/radix.py``) is planned here at every shape (its table limits and the
slices' one-wave limit lifted; rows say which path ``plan_select`` picks); ``radix.MIN_SLICE`` raised past any table
gives the one-program plan of the same settings. Their lists must be equal bit for bit before anything is timed.
Shapes: 1 x 128K, 1 x 32K, 1 x 64K, 1 x 128K + 96 tokens (8198-block tables), 2 x 128K, 8 x 128K (32 query / 8 KV
heads of 128, bf16, blocks of 16), Quest over bf16 and fp8 reprs. Timed (do_bench median, L2 cleared before every
call; CUDA-graph replay and eager): the selection alone (device time by kernel from torch.profiler, Quest on bf16
reprs) and selection + attention. Then at 1 x 128K, per layer of one graph
of LAYERS layers (``sliced_topk_ab.layered_rows``'s setting: each layer its own KV, reprs and query): the dense
decodes (SDPA, ours, FlashInfer's two paged kernels when carried), attention alone, select + attend both ways, and
``select_every 8`` composed as ``(select_attend + 7 x attend) / 8``, every speedup against the fastest dense. Then
one request of 4K to 128K tokens in a vLLM engine's 8192-block table, and of 4K to 64K in a 4096-block one
(``wide_rows``): the selection and attention planned by the table's width against planned by the request's own,
and the radix top-k alone with its rows cut to the request and not (``cut_rows_ab``). Last, the top-k alone from
given scores at 1 x 8192 blocks (normal and equal scores).

    python -m bench.radix_topk_ab [--quick | --wide]     # JSON under $OUT or bench/results/
"""
import contextlib
import sys

import torch

from bench.bench_sparse_decode import HEAD_DIM, NUM_KV_HEADS, graph_of, median_ms
from bench.harness import measure_copy_ceilings, row, settings_changed, write_results
from bench.profile_gsa_kernels import kernel_times
from bench.sliced_topk_ab import FLASHINFER, LAYERS, dense_steps, inputs
from bench.sliced_topk_ab import SIZES as BUDGET_SIZES
from ucm_kernels.block_select import plan_select, radix, selection_width
from ucm_kernels.block_select import triton as block_select_triton
from ucm_kernels.sparse_decode import plan_decode, sparse_decode

SIZES = {**BUDGET_SIZES, "token_budget": None}  # sparse_ratio 0.3, windows 1 + 4, at least 8 blocks
# batch, context, tokens past it (the first: --quick)
SHAPES = ((1, 131072, 0), (1, 32768, 0), (1, 65536, 0), (1, 131072, 96), (2, 131072, 0), (8, 131072, 0))
PATHS = ("radix", "one_program")
WIDE_CONTEXTS = (4096, 16384, 32768, 65536, 131072)  # requests in a 128K engine's table (wide_rows)
CUT_SETTINGS = ((), (2,), (4,), (2, 4), (4, 16), (2, 4, 16))  # radix.CUTS compared by cut_rows_ab


def one_program():
    """Plans made inside take one program a row (no table is cut into slices)."""
    return settings_changed(radix, MIN_SLICE=1 << 30)


@contextlib.contextmanager
def radix_anywhere():
    """Plans made inside take the radix top-k at any table of 2 to 16384 blocks, however many rows."""
    with settings_changed(radix, MIN_BLOCKS=2, ROWS=tuple(1 << n for n in range(15))), \
            settings_changed(block_select_triton, sm_count=lambda device: 1 << 30):
        yield


def plans(batch: int, blocks: int) -> tuple[dict, str]:
    """({"radix": ..., "one_program": ...}, the one ``plan_select`` picks): the same settings planned with the
    slices' one-wave limit lifted and without slices."""
    planned = "radix" if plan_select(batch, NUM_KV_HEADS, HEAD_DIM, blocks, **SIZES, device="cuda").radix_slice \
        else "one_program"
    with radix_anywhere():
        made = {"radix": plan_select(batch, NUM_KV_HEADS, HEAD_DIM, blocks, **SIZES, device="cuda")}
    with one_program():
        made["one_program"] = plan_select(batch, NUM_KV_HEADS, HEAD_DIM, blocks, **SIZES, device="cuda")
    assert made["radix"].radix_slice and not made["one_program"].radix_slice
    return made, planned


def assert_equal_lists(lists: dict, what: str) -> None:
    for i, name in enumerate(("sel_idx", "sel_count")):
        assert torch.equal(lists["radix"][i], lists["one_program"][i]), f"{what}: {name} differ"


def shape_rows(batch: int, context: int, extra: int) -> list[dict]:
    case = inputs(batch, context, extra)
    q, kv, table, lens = case["q"], case["kv"], case["table"], case["lens"]
    shape = f"b{batch}_ctx{context + extra}_ratio0.3"
    out = torch.empty_like(q)
    decode_plan = plan_decode(q, kv[0], selection_width(case["blocks"], **SIZES))
    rows = []
    for rule, reprs in case["reprs"].items():
        made, planned = plans(batch, case["blocks"])
        lists = {name: plan.run(q, block_table=table, seq_lens=lens, **reprs) for name, plan in made.items()}
        assert_equal_lists(lists, f"{shape} {rule}")
        for name, plan in made.items():
            kept = tuple(t.clone() for t in lists[name])

            def select(plan=plan, kept=kept):
                return plan.run(q, block_table=table, seq_lens=lens, out=kept, **reprs)

            times = {"select": median_ms(select),
                     "select_attend": median_ms(lambda: sparse_decode(q, kv[0], kv[1], table, lens, *select(),
                                                                      out=out, plan=decode_plan))}
            more = dict(slice_blocks=plan.radix_slice, planned=name == planned)
            if rule == "quest":
                more["kernels_us"] = kernel_times(graph_of(select))
            rows += [row(what, f"ucm_{rule}_{name}", shape, ms[mode], mode=mode, **more)
                     for what, ms in times.items() for mode in ms]
    return rows


def layered_rows(batch: int, context: int) -> list[dict]:
    """Per layer of one graph of LAYERS layers at sparse_ratio 0.3: dense decodes, attention alone, select +
    attend with either top-k, and select_every 8 composed."""
    cases = [inputs(batch, context, 0) for _ in range(LAYERS)]
    blocks = cases[0]["blocks"]
    shape = f"b{batch}_ctx{context}_ratio0.3_L{LAYERS}"
    out = torch.empty_like(cases[0]["q"])
    decode_plan = plan_decode(cases[0]["q"], cases[0]["kv"][0], selection_width(blocks, **SIZES))
    made, _ = plans(batch, blocks)

    def attend(c, sel):
        return sparse_decode(c["q"], c["kv"][0], c["kv"][1], c["table"], c["lens"], *sel, out=out, plan=decode_plan)

    def select(plan, c, rule, kept):
        return plan.run(c["q"], block_table=c["table"], seq_lens=c["lens"], out=kept, **c["reprs"][rule])

    dense = dense_steps(cases, out)
    steps = dict(dense)
    for rule in ("quest", "quest_fp8"):
        kept = [tuple(t.clone() for t in select(made["radix"], c, rule, None)) for c in cases]
        for c, sel in zip(cases, kept):
            assert_equal_lists({name: select(plan, c, rule, None) for name, plan in made.items()}, f"{shape} {rule}")
        steps[f"attend_{rule}"] = lambda kept=kept: [attend(c, sel) for c, sel in zip(cases, kept)]
        for name, plan in made.items():
            steps[f"select_attend_{rule}_{name}"] = lambda plan=plan, rule=rule, kept=kept: [
                attend(c, select(plan, c, rule, sel)) for c, sel in zip(cases, kept)]
    times = {name: {mode: ms / LAYERS for mode, ms in median_ms(step).items()} for name, step in steps.items()}
    best = {mode: min(times[impl][mode] for impl in dense) for mode in ("cuda_graph", "eager")}
    rows = [row(name, "per_layer", shape, ms[mode], mode=mode, layers=LAYERS) for name, ms in times.items()
            for mode in ms]
    for rule in ("quest", "quest_fp8"):
        for name in PATHS:
            for mode in ("cuda_graph", "eager"):
                every8 = (times[f"select_attend_{rule}_{name}"][mode] + 7 * times[f"attend_{rule}"][mode]) / 8
                rows.append(row(f"select_attend_every8_{rule}_{name}", "per_layer", shape, every8, mode=mode,
                                layers=LAYERS, speedup_vs_best_dense=best[mode] / every8,
                                composed="(select_attend + 7 x attend) / 8"))
    return rows


def wide_rows(width: int) -> list[dict]:
    """One request of each of WIDE_CONTEXTS tokens that fits in a ``width``-block table (a vLLM engine's,
    max_model_len / block_size columns, the rest padding) at sparse_ratio 0.3, Quest bf16: the selection as
    ``plan_select`` plans it for the table (and at that width one program a row, and the radix top-k where it is
    not the one planned), and as it plans the request's own width (a table cut to it); attention with the decode
    plan of either width. Lists equal before timing (the wide ones -1 past the narrow)."""
    rows = []
    for context in (c for c in WIDE_CONTEXTS if c <= width * SIZES["block_size"]):
        case = inputs(1, context, 0)
        q, kv, lens, reprs, own = case["q"], case["kv"], case["lens"], case["reprs"]["quest"], case["blocks"]
        wide = torch.zeros(1, width, dtype=torch.int32, device="cuda")
        wide[:, :own] = case["table"]
        made = {"table_width": plan_select(1, NUM_KV_HEADS, HEAD_DIM, width, **SIZES, device="cuda"),
                "own_width": plan_select(1, NUM_KV_HEADS, HEAD_DIM, own, **SIZES, device="cuda")}
        with one_program():
            made["table_width_one_program"] = plan_select(1, NUM_KV_HEADS, HEAD_DIM, width, **SIZES, device="cuda")
        if not made["table_width"].radix_slice:
            with radix_anywhere():
                made["table_width_radix"] = plan_select(1, NUM_KV_HEADS, HEAD_DIM, width, **SIZES, device="cuda")
        tables = {name: case["table"] if name == "own_width" else wide for name in made}
        lists = {name: plan.run(q, block_table=tables[name], seq_lens=lens, **reprs) for name, plan in made.items()}
        narrow_idx, narrow_count = lists["own_width"]
        for name, (idx, count) in lists.items():
            assert torch.equal(count, narrow_count), f"{context} {name}: sel_count differ"
            assert torch.equal(idx[..., :narrow_idx.shape[2]], narrow_idx), f"{context} {name}: sel_idx differ"
            assert bool((idx[..., narrow_idx.shape[2]:] == -1).all()), f"{context} {name}: padding not -1"
        out = torch.empty_like(q)
        shape = f"b1_ctx{context}_table{width}_ratio0.3"
        for name, plan in made.items():
            table = tables[name]
            kept = tuple(t.clone() for t in lists[name])
            decode_plan = plan_decode(q, kv[0], kept[0].shape[2])

            def select(plan=plan, table=table, kept=kept):
                return plan.run(q, block_table=table, seq_lens=lens, out=kept, **reprs)

            def attend(table=table, kept=kept, decode_plan=decode_plan):
                return sparse_decode(q, kv[0], kv[1], table, lens, *kept, out=out, plan=decode_plan)

            times = {"select": median_ms(select), "attend": median_ms(attend),
                     "select_attend": median_ms(lambda: (select(), attend()))}
            more = dict(slice_blocks=plan.radix_slice, slices=plan.slices, splits=decode_plan.num_splits,
                        kernels_us=kernel_times(graph_of(select)))
            rows += [row(what, f"ucm_quest_{name}", shape, ms["cuda_graph"], **more) for what, ms in times.items()]
        torch.cuda.empty_cache()
    return rows


def row_cuts(cuts: tuple[int, ...]):
    """Radix launches inside cut rows of 4096 and 8192 keys by ``cuts`` (``radix.CUTS``; () cuts none: the kernel
    compiled without the cuts)."""
    return settings_changed(radix, CUTS={4096: cuts, 8192: cuts})


def cut_rows_ab() -> list[dict]:
    """The radix top-k alone from given scores (normal, one request, 8 KV heads) with its rows cut by each of
    CUT_SETTINGS (() not at all) and one program a row, at 8192- and 4096-block tables for a request filling the
    table and shorter ones; lists equal first (CUDA-graph replays, do_bench median)."""
    rows = []
    for blocks, contexts in ((8192, (131072, 65536, 16384, 4096)), (4096, (65536, 32768, 4096))):
        scores = torch.randn(1, NUM_KV_HEADS, blocks, device="cuda")
        with radix_anywhere():
            radix_plan = score_plan(scores)
        with one_program():
            one_plan = score_plan(scores)
        for context in contexts:
            lens = torch.full((1,), context, dtype=torch.int32, device="cuda")
            launches = {"one_program": top_k_launch(one_plan, scores, lens)}
            for cuts in CUT_SETTINGS:
                def launch(cuts=cuts, plain=top_k_launch(radix_plan, scores, lens)):
                    with row_cuts(cuts):
                        return plain()

                launches["radix_cuts_" + "_".join(map(str, cuts)) if cuts else "radix_uncut"] = launch
            lists = {name: tuple(t.clone() for t in launch()) for name, launch in launches.items()}
            for name in lists:
                assert all(torch.equal(a, b) for a, b in zip(lists[name], lists["one_program"])), f"{context} {name}"
            for name, launch in launches.items():
                rows.append(row("topk_cut_ab", name, f"b1_blocks{blocks}_ctx{context}", median_ms(launch)["cuda_graph"],
                                kernels_us=kernel_times(graph_of(launch))))
    return rows


def score_rows(blocks: int = 8192) -> list[dict]:
    """The top-k launches alone from given scores (one request, 8 KV heads), normal and equal, both ways (plans
    made once, as ``SelectPlan.run`` uses them)."""
    lens = torch.full((1,), blocks * 16, dtype=torch.int32, device="cuda")
    rows = []
    for kind, scores in (("normal", torch.randn(1, NUM_KV_HEADS, blocks, device="cuda")),
                         ("equal", torch.ones(1, NUM_KV_HEADS, blocks, device="cuda"))):
        with radix_anywhere():
            made = {"radix": score_plan(scores)}
        with one_program():
            made["one_program"] = score_plan(scores)
        launches = {name: top_k_launch(plan, scores, lens) for name, plan in made.items()}
        lists = {name: launch() for name, launch in launches.items()}
        assert_equal_lists(lists, f"{kind} scores")
        for name, launch in launches.items():
            rows.append(row("topk_from_scores", name, f"b1_blocks{blocks}_{kind}", median_ms(launch)["cuda_graph"],
                            kernels_us=kernel_times(graph_of(launch))))
    return rows


def top_k_launch(plan, scores: torch.Tensor, lens: torch.Tensor):
    """A call launching ``plan``'s top-k over ``scores`` into lists of its own, returned (made once, reused)."""
    batch, heads, _ = scores.shape
    lists = (torch.empty(batch, heads, plan.width, dtype=torch.int32, device=scores.device),
             torch.empty(batch, heads, dtype=torch.int32, device=scores.device))

    def launch():
        block_select_triton._launch_select(plan, scores, lens, *lists, None, None)
        return lists

    return launch


def score_plan(scores: torch.Tensor):
    """The plan ``select_from_scores`` makes for ``scores`` under SIZES (the top-k's scratch, made once)."""
    batch, heads, blocks = scores.shape
    return block_select_triton._make_plan(batch, heads, 1, blocks, scores.device, SIZES["block_size"],
                                          SIZES["sparse_ratio"], SIZES["init_window"], SIZES["local_window"],
                                          SIZES["min_blocks"], "quest", None, scores=scores)


def main() -> None:
    """All figures; with ``--quick`` only the selection at 1 x 128K and the top-k from given scores; with
    ``--wide`` only the requests in a wide table."""
    quick, wide_only = "--quick" in sys.argv[1:], "--wide" in sys.argv[1:]
    ceilings = measure_copy_ceilings()
    rows = []
    for batch, context, extra in () if wide_only else SHAPES[:1] if quick else SHAPES:
        rows += shape_rows(batch, context, extra)
        torch.cuda.empty_cache()
    if not quick and not wide_only:
        rows += layered_rows(1, 131072)
        torch.cuda.empty_cache()
    if not quick:
        rows += cut_rows_ab() + wide_rows(8192) + wide_rows(4096)
    if not wide_only:
        rows += score_rows()
    path = write_results("radix_topk_ab", rows, ceilings, extra={
        "sizes": SIZES, "flashinfer": FLASHINFER or "not installed: no FlashInfer rows",
        "timing": "do_bench median, L2 cleared before every call; cuda_graph: replay of the captured call, "
        "eager: the Python call"})
    for r in rows:
        if r.get("mode", "cuda_graph") == "cuda_graph":
            print(f"{r['name']:40s} {r['impl']:26s} {r['shape']:28s} {r['median_ms'] * 1000:8.1f} us "
                  f"{r.get('speedup_vs_best_dense', '')} {r.get('kernels_us', '')}")
    print(path)


if __name__ == "__main__":
    main()
