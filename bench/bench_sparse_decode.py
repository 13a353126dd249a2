"""GSA decode on the GPU: block selection + sparse paged attention against FlashInfer, torch SDPA and our dense kernel.

bf16, 32 query / 8 KV heads, head_dim 128, block_size 16; batch 1, 8, 32 x contexts 32K, 128K; random data,
physical blocks shuffled. One run measures the HBM copy ceiling, the floor (KV bytes / copy bandwidth), torch
SDPA over the full contiguous KV, FlashInfer's paged decode over the paged KV as is (CUDA-core and tensor-core
kernels, ``bench.flashinfer_peer``), our dense_decode, select_blocks alone (Quest and mean-key rules on bf16 reprs,
Quest on fp8 reprs: ``ucm_quest_fp8``), sparse_decode alone, and select+attend at sparse_ratio 0.3 and at a
2048-token budget (GSA windows: init 1, local 4, min 8 blocks). Our calls run as a decode step runs them: plans
(``plan_select``, ``plan_decode``) made once per step, then one ``plan.run`` + ``sparse_decode(plan=...)`` per
layer. FlashInfer also attends the Quest selections' block lists (heads folded into the batch over a head-major
copy), beside our sparse_decode. Selection reuse (``GSAConfig.select_every`` N in REUSE_EVERY): a step that
reuses (``select_attend_reused``: the selection launched with no row to reselect, as a plan that reuses makes
it, then attention over the kept lists) is timed like every other figure, and a step of select_every N costs
``(select_attend + (N - 1) x select_attend_reused) / N`` (timing N steps in one graph instead would let a step
read the previous one's KV from L2, which the other layers of a real step flush). With block 16 and N dividing
16, a steady decode reselects exactly every N steps (a filled block coincides with an N-th step).
Every shape is checked before it is timed. Speedups are against the fastest dense of the run (FlashInfer, SDPA
or ours); our dense_decode's against the faster peer (FlashInfer or SDPA).

Each figure is timed twice, as ``mode``: ``cuda_graph`` (the call captured once in a CUDA graph, the replay
timed: decode runs under CUDA graphs in vLLM, so this is the GPU time a step sees) and ``eager`` (the Python
call timed, host launch work included). Both are triton.testing.do_bench medians, which clear a 256 MB buffer
before every call, so nothing stays in the 50 MB L2. Speedups compare like with like (graph vs graph, eager
vs eager); the targets are judged on the graph figures.

Usage, from the repo root on the GPU: ``python -m bench.bench_sparse_decode`` (JSON under $OUT or bench/results/).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from bench import flashinfer_peer
from bench.harness import measure_copy_ceilings, row, write_results
from ucm_kernels.block_repr import empty_block_repr, torch_update_block_repr, update_block_repr
from ucm_kernels.block_select import plan_select, select_blocks, selection_width
from ucm_kernels.sparse_decode import dense_decode, plan_decode, sparse_decode
from ucm_kernels.sparse_decode.naive import naive_sparse_decode

SHAPES = [(8, 131072), (1, 131072), (32, 131072), (1, 32768), (8, 32768), (32, 32768)]
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
WINDOWS = dict(block_size=BLOCK_SIZE, init_window=1, local_window=4, min_blocks=8)
SELECTIONS = {"ratio0.3": dict(sparse_ratio=0.3), "budget2048": dict(sparse_ratio=0.3, token_budget=2048)}
RULES = {"quest": "quest", "mean": "mean", "quest_fp8": "quest"}  # impl suffix -> score rule; _fp8: fp8 reprs
FP8 = torch.float8_e4m3fn
FP8_CHECK_BLOCKS = 4096  # fp8 reprs checked bit for bit against the reference on this many blocks
MODES = ("cuda_graph", "eager")
REUSE_EVERY = (4, 8)  # select_every settings timed (quality: bench/sparse_quality_model.py --reuse)
MAX_REL_ERROR = 2e-2  # relative L2 error allowed against the reference (bf16 output rounding is ~4e-3)
FLASHINFER = flashinfer_peer.available()
TARGETS = {"b8_ctx131072": {"dense_vs_flashinfer": 1.0, "ratio0.3_speedup": 2.8, "budget2048_speedup": 12.0},
           "b1_ctx131072": {"dense_vs_flashinfer": 1.0, "ratio0.3_speedup": 2.5, "budget2048_speedup": 8.0},
           "b32_ctx32768": {"dense_vs_flashinfer": 1.0}}  # issue 18


@dataclass
class Case:
    """One batch x context: paged KV (K, V views of one tensor), its contiguous copy for SDPA, block reprs (bf16
    and fp8 with its scales), and the per-step plans (selection per rule and budget, attention per list width,
    dense)."""
    batch: int
    context: int
    q: torch.Tensor
    kv: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    dense_k: torch.Tensor
    dense_v: torch.Tensor
    reprs: tuple
    fp8_reprs: tuple
    select_plans: dict = field(default_factory=dict)
    decode_plans: dict = field(default_factory=dict)
    peer_dense: dict = field(default_factory=dict)  # FlashInfer impl -> PagedDecode over every block
    peer_sparse: dict = field(default_factory=dict)  # selection -> PagedDecode over the Quest block lists
    head_major_kv: tuple = ()  # K, V as single-head pages (FlashInfer's sparse rows)

    @property
    def shape(self) -> str:
        return f"b{self.batch}_ctx{self.context}"

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize


def bytes_needed(batch: int, context: int) -> int:
    """Paged KV + contiguous copy + one transient gather + head-major copy (FlashInfer) + bf16 and fp8 reprs,
    with 10% slack."""
    kv = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    return int(1.1 * (kv * (3.5 if FLASHINFER else 2.5) + 4.6 * kv / (2 * BLOCK_SIZE)))


def paged_inputs(batch: int, context: int) -> tuple[torch.Tensor, ...]:
    """Random decode inputs on the GPU: q ``[batch, NUM_Q_HEADS, HEAD_DIM]``, paged K/V ``[2, batch * blocks,
    BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM]`` with shuffled physical blocks, the int32 block table and seq_lens, and
    the contiguous ``[batch, NUM_KV_HEADS, context, HEAD_DIM]`` K and V copies SDPA reads."""
    blocks = context // BLOCK_SIZE
    kv = torch.randn(2, batch * blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    block_table = torch.randperm(batch * blocks, device="cuda").view(batch, blocks).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    dense_k, dense_v = (kv[i][block_table.long()].flatten(1, 2).transpose(1, 2).contiguous() for i in range(2))
    return q, kv, block_table, seq_lens, dense_k, dense_v


def build_case(batch: int, context: int) -> Case:
    blocks = context // BLOCK_SIZE
    q, kv, block_table, seq_lens, dense_k, dense_v = paged_inputs(batch, context)
    reprs, fp8_reprs = empty_block_repr(kv[0]), empty_block_repr(kv[0], FP8)
    update_block_repr(kv[0], block_table.flatten(), *reprs)
    update_block_repr(kv[0], block_table.flatten(), *fp8_reprs)
    case = Case(batch, context, q, kv, block_table, seq_lens, dense_k, dense_v, reprs, fp8_reprs)
    for selection, sizes in SELECTIONS.items():
        for rule, score in RULES.items():
            case.select_plans[selection, rule] = plan_select(batch, NUM_KV_HEADS, HEAD_DIM, blocks, **WINDOWS,
                                                             **sizes, score=score, device="cuda")
        width = selection_width(blocks, **WINDOWS, **sizes)
        case.decode_plans[selection] = plan_decode(q, kv[0], width)
    case.decode_plans["dense"] = plan_decode(q, kv[0], blocks, dense=True)
    if FLASHINFER:
        plan_peer(case)
    return case


def plan_peer(case: Case) -> None:
    """FlashInfer over every block (each kernel), and over the Quest selections' lists (its faster kernel for
    rows of one KV head: CUDA cores)."""
    shape = dict(head_dim=HEAD_DIM, page_size=BLOCK_SIZE, dtype=DTYPE)
    case.peer_dense = flashinfer_peer.dense_decoders(case.block_table, case.seq_lens, num_q_heads=NUM_Q_HEADS,
                                                     num_kv_heads=NUM_KV_HEADS, **shape)
    case.head_major_kv = tuple(flashinfer_peer.head_major(case.kv[i]) for i in range(2))
    for selection in SELECTIONS:
        sel_idx, sel_count = select(case, selection, "quest")
        lists = flashinfer_peer.sparse_pages(case.block_table, case.seq_lens, sel_idx, sel_count, BLOCK_SIZE)
        case.peer_sparse[selection] = flashinfer_peer.PagedDecode(
            *lists, num_q_heads=NUM_Q_HEADS // NUM_KV_HEADS, num_kv_heads=1, tensor_cores=False, **shape)


def peer_dense(case: Case, impl: str, out: torch.Tensor) -> torch.Tensor:
    return case.peer_dense[impl].run(case.q, case.kv[0], case.kv[1], out=out)


def peer_sparse(case: Case, selection: str, out: torch.Tensor) -> torch.Tensor:
    """FlashInfer over the Quest lists: ``[batch, num_q_heads, head_dim]`` (rows are (request, KV head))."""
    rows = case.batch * NUM_KV_HEADS
    q = case.q.view(rows, NUM_Q_HEADS // NUM_KV_HEADS, HEAD_DIM)
    return case.peer_sparse[selection].run(q, *case.head_major_kv, out=out.view(q.shape)).view(case.q.shape)


def sdpa(case: Case) -> torch.Tensor:
    return F.scaled_dot_product_attention(case.q[:, :, None], case.dense_k, case.dense_v, enable_gqa=True)[:, :, 0]


def dense(case: Case, out: torch.Tensor) -> torch.Tensor:
    return dense_decode(case.q, case.kv[0], case.kv[1], case.block_table, case.seq_lens, out=out,
                        plan=case.decode_plans["dense"])


def rule_reprs(case: Case, rule: str) -> dict:
    """The repr arguments of the selection calls: kmin, kmax, kmean (and kscale for the fp8 rules)."""
    if rule.endswith("_fp8"):
        return dict(zip(("kmin", "kmax", "kmean", "kscale"), case.fp8_reprs))
    return dict(zip(("kmin", "kmax", "kmean"), case.reprs))


def select(case: Case, selection: str, rule: str, out=None, reselect=None):
    """One layer's selection through the step's plan (of the rows ``reselect`` names, when given)."""
    return case.select_plans[selection, rule].run(case.q, block_table=case.block_table, seq_lens=case.seq_lens,
                                                  out=out, reselect=reselect, **rule_reprs(case, rule))


def reused_step(case: Case, selection: str, rule: str, sel: tuple, out: torch.Tensor):
    """One layer's decode step that reuses every row's lists ``sel``: the selection launched with no row to
    reselect, then attention."""
    keep_all = torch.zeros(case.batch, dtype=torch.int32, device=case.q.device)
    return lambda: attend(case, selection, *select(case, selection, rule, out=sel, reselect=keep_all), out)


def attend(case: Case, selection: str, sel_idx: torch.Tensor, sel_count: torch.Tensor, out: torch.Tensor):
    return sparse_decode(case.q, case.kv[0], case.kv[1], case.block_table, case.seq_lens, sel_idx, sel_count,
                         out=out, plan=case.decode_plans[selection])


def layer_steps(case: Case, out: torch.Tensor) -> dict:
    """{name: launch} of one layer's decode steps of ``case`` with Quest selection, each writing ``out`` (as
    ``case.q``) and returning it: ``dense``, then per selection ``select_attend_<selection>`` and
    ``reuse_step_<selection>`` (reusing the lists the selection makes now)."""
    steps = {"dense": lambda: dense(case, out)}
    for selection in SELECTIONS:
        kept = tuple(t.clone() for t in select(case, selection, "quest"))
        steps[f"select_attend_{selection}"] = (
            lambda selection=selection: attend(case, selection, *select(case, selection, "quest"), out))
        steps[f"reuse_step_{selection}"] = reused_step(case, selection, "quest", kept, out)
    return steps


def check(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Finite and within MAX_REL_ERROR (relative L2), else stop the run before any timing of this shape."""
    actual, expected = actual.float(), expected.float()
    rel = ((actual - expected).norm() / expected.norm()).item()
    if not torch.isfinite(actual).all() or rel > MAX_REL_ERROR:
        raise AssertionError(f"{what}: relative L2 error {rel:.2e} (allowed {MAX_REL_ERROR}), "
                             f"finite={bool(torch.isfinite(actual).all())}")


def nan_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def check_fp8_reprs(case: Case) -> None:
    """fp8 reprs bit for bit against the torch twin (itself tested against the loop reference) on a sample of
    blocks, and outward (kmin * kscale <= the exact bf16 kmin, kmax * kscale >= kmax) on every block."""
    ids = case.block_table.flatten()[:FP8_CHECK_BLOCKS]
    sample = case.kv[0][ids]
    expected = empty_block_repr(sample, FP8)
    torch_update_block_repr(sample, torch.arange(len(ids), device="cuda"), *expected)
    kmin, kmax, kmean, kscale = case.fp8_reprs
    for name, got, want in (("kmin", kmin, expected[0]), ("kmax", kmax, expected[1])):
        if not torch.equal(got[ids].view(torch.uint8), want.view(torch.uint8)):
            raise AssertionError(f"{case.shape}: fp8 {name} differs from the reference")
    if not torch.equal(kscale[ids], expected[3]):
        raise AssertionError(f"{case.shape}: fp8 kscale differs from the reference")
    check(f"{case.shape} fp8 kmean vs reference", kmean[ids].float(), expected[2].float())
    scale = kscale[..., None]
    outward = (kmin.float() * scale <= case.reprs[0].float()) & (kmax.float() * scale >= case.reprs[1].float())
    if not outward.all():
        raise AssertionError(f"{case.shape}: fp8 kmin/kmax are not outward bounds of the exact min/max")


def check_case(case: Case) -> None:
    """One-shot calls against the references; the planned calls the timings use must give the same bits."""
    reference = sdpa(case)
    one_shot = dense_decode(case.q, case.kv[0], case.kv[1], case.block_table, case.seq_lens, out=nan_like(case.q))
    check(f"{case.shape} dense_decode vs SDPA", one_shot, reference)
    for impl in case.peer_dense:
        check(f"{case.shape} {impl} vs SDPA", peer_dense(case, impl, nan_like(case.q)), reference)
    if not torch.equal(dense(case, nan_like(case.q)), one_shot):
        raise AssertionError(f"{case.shape}: planned dense_decode differs from the one-shot call")
    check_fp8_reprs(case)
    rows = [0, case.batch - 1]
    for selection, sizes in SELECTIONS.items():
        for rule, score in RULES.items():
            sel_idx, sel_count = select_blocks(case.q, block_table=case.block_table, seq_lens=case.seq_lens,
                                               **WINDOWS, **sizes, score=score, **rule_reprs(case, rule))
            planned = select(case, selection, rule)
            if not (torch.equal(planned[0], sel_idx) and torch.equal(planned[1], sel_count)):
                raise AssertionError(f"{case.shape} {selection} {rule}: planned selection differs from one-shot")
            out = sparse_decode(case.q, case.kv[0], case.kv[1], case.block_table, case.seq_lens, sel_idx,
                                sel_count, out=nan_like(case.q))
            expected = naive_sparse_decode(case.q[rows], case.kv[0], case.kv[1], case.block_table[rows],
                                           case.seq_lens[rows], sel_idx[rows], sel_count[rows])
            check(f"{case.shape} {selection} {rule} sparse_decode vs naive (requests {rows})", out[rows], expected)
            if not torch.equal(attend(case, selection, sel_idx, sel_count, nan_like(case.q)), out):
                raise AssertionError(f"{case.shape} {selection} {rule}: planned sparse_decode differs")
            check_reuse(case, selection, rule, (sel_idx, sel_count), out)
            if rule == "quest" and selection in case.peer_sparse:
                check(f"{case.shape} {selection} FlashInfer on the Quest lists vs sparse_decode",
                      peer_sparse(case, selection, nan_like(case.q)), out)


def check_reuse(case: Case, selection: str, rule: str, expected: tuple, expected_out: torch.Tensor) -> None:
    """The timed reuse step leaves the kept lists as they are and attends them."""
    held = tuple(torch.randint_like(t, -1, 100) for t in expected)
    kept = tuple(t.clone() for t in held)
    reused_step(case, selection, rule, kept, nan_like(case.q))()
    if not all(map(torch.equal, kept, held)):
        raise AssertionError(f"{case.shape} {selection} {rule}: a launch with no row to reselect changed the lists")
    kept = tuple(t.clone() for t in expected)
    reused_step(case, selection, rule, kept, out := nan_like(case.q))()
    if not torch.equal(out, expected_out):
        raise AssertionError(f"{case.shape} {selection} {rule}: the reuse step's output differs from attention")


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after warm-up calls on a side stream (they compile its kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def median_ms(fn) -> dict:
    """{mode: ms}: the replay of ``fn`` captured in a CUDA graph, and the eager call."""
    graph = graph_of(fn)
    found = {"cuda_graph": do_bench(graph.replay, warmup=25, rep=100, return_mode="median"),
             "eager": do_bench(fn, warmup=25, rep=100, return_mode="median")}
    del graph
    return found


def timed_rows(name: str, impl: str, shape: str, times: dict, nbytes: int | None = None,
               hbm_gbps: float | None = None, baseline: dict | None = None, **extra) -> list[dict]:
    """One row per mode; ``baseline`` ({mode: ms}) gives each mode's speedup against the same mode."""
    return [row(name, impl, shape, times[mode], nbytes, hbm_gbps, baseline[mode] if baseline else None, mode=mode,
                **extra) for mode in MODES]


def dense_rows(case: Case, out: torch.Tensor, hbm_gbps: float) -> tuple[list[dict], dict]:
    """The peers (torch SDPA over the contiguous KV, FlashInfer's kernels over the paged KV) and our dense_decode
    over the paged KV, against the floor (ours: speedup against the faster peer); also returns the fastest of
    all per mode."""
    floor_ms = case.kv_bytes() / (hbm_gbps * 1e9) * 1e3
    peers = {"sdpa": median_ms(lambda: sdpa(case))}
    for impl in case.peer_dense:
        peers[impl] = median_ms(lambda: peer_dense(case, impl, out))
    dense_ms = median_ms(lambda: dense(case, out))
    best_peer = {mode: min(times[mode] for times in peers.values()) for mode in MODES}
    flashinfer = {mode: min((peers[impl][mode] for impl in case.peer_dense), default=None) for mode in MODES}
    rows = []
    for mode in MODES:
        versus = {"vs_flashinfer": round(flashinfer[mode] / dense_ms[mode], 3)} if flashinfer[mode] else {}
        rows += [row("decode_dense", impl, case.shape, times[mode], case.kv_bytes(), hbm_gbps, mode=mode,
                     floor_ms=round(floor_ms, 5), x_floor=round(times[mode] / floor_ms, 3))
                 for impl, times in peers.items()]
        rows.append(row("decode_dense", "ucm_dense_decode", case.shape, dense_ms[mode], case.kv_bytes(), hbm_gbps,
                        best_peer[mode], mode=mode, floor_ms=round(floor_ms, 5),
                        x_floor=round(dense_ms[mode] / floor_ms, 3), baseline=best_impl(peers, mode), **versus))
    return rows, {mode: min(best_peer[mode], dense_ms[mode]) for mode in MODES}


def best_impl(times: dict, mode: str) -> str:
    """The impl of ``times`` ({impl: {mode: ms}}) fastest in ``mode``."""
    return min(times, key=lambda impl: times[impl][mode])


def selection_rows(case: Case, selection: str, out: torch.Tensor, hbm_gbps: float, best_dense: dict) -> list[dict]:
    """select alone and select+attend for every rule; sparse_decode alone on the Quest lists."""
    shape, rows = f"{case.shape}_{selection}", []
    for rule in RULES:
        sel = select(case, selection, rule)
        select_ms = median_ms(lambda: select(case, selection, rule, out=sel))
        rows += timed_rows("select_blocks_per_layer", f"ucm_{rule}", shape, select_ms, repr_bytes(case, rule),
                           hbm_gbps, share_of_best_dense=round(select_ms["cuda_graph"] / best_dense["cuda_graph"], 3))
        both_ms = median_ms(lambda: attend(case, selection, *select(case, selection, rule, out=sel), out))
        rows += timed_rows("select_attend", f"ucm_{rule}", shape, both_ms, baseline=best_dense)
        reused_ms = median_ms(reused_step(case, selection, rule, sel, out))
        rows += timed_rows("select_attend_reused", f"ucm_{rule}", shape, reused_ms, baseline=best_dense)
        for every in REUSE_EVERY:
            per_step = {mode: (both_ms[mode] + (every - 1) * reused_ms[mode]) / every for mode in MODES}
            rows += timed_rows(f"select_attend_every{every}", f"ucm_{rule}", shape, per_step, baseline=best_dense,
                               select_every=every, composed="(select_attend + (N - 1) x select_attend_reused) / N")
    sel_idx, sel_count = select(case, selection, "quest")
    attend_ms = median_ms(lambda: attend(case, selection, sel_idx, sel_count, out))
    tokens = round(sel_count.float().mean().item() * BLOCK_SIZE)
    rows += timed_rows("sparse_attend", "ucm_sparse_decode", shape, attend_ms, selected_bytes(sel_count), hbm_gbps,
                       best_dense, mean_tokens_per_head=tokens)
    if selection in case.peer_sparse:
        peer_ms = median_ms(lambda: peer_sparse(case, selection, out))
        rows += timed_rows("sparse_attend", "flashinfer_sparse", shape, peer_ms, selected_bytes(sel_count), hbm_gbps,
                           best_dense, mean_tokens_per_head=tokens)
    return rows


def bench_case(case: Case, hbm_gbps: float) -> list[dict]:
    out = nan_like(case.q)
    rows, best_dense = dense_rows(case, out, hbm_gbps)
    for selection in SELECTIONS:
        rows += selection_rows(case, selection, out, hbm_gbps, best_dense)
    return rows


def repr_bytes(case: Case, rule: str) -> int:
    """Repr bytes one selection reads: kmin + kmax (Quest) or kmean, plus kscale for fp8 reprs, every block of
    every request and head."""
    reprs = rule_reprs(case, rule)
    per_head = HEAD_DIM * reprs["kmin"].element_size() * (2 if RULES[rule] == "quest" else 1)
    per_head += reprs["kscale"].element_size() if "kscale" in reprs else 0
    return case.batch * (case.context // BLOCK_SIZE) * NUM_KV_HEADS * per_head


def selected_bytes(sel_count: torch.Tensor) -> int:
    return int(sel_count.sum()) * BLOCK_SIZE * HEAD_DIM * DTYPE.itemsize * 2


def verdicts(rows: list[dict]) -> dict:
    """Issue 18's targets at the shapes in TARGETS, judged on the CUDA-graph rows (eager figures beside): our
    dense_decode against FlashInfer's faster kernel, select + attend against the fastest dense."""
    found = {}
    measured = {r["shape"] for r in rows}

    def speedups(key: str = "speedup_vs_baseline", **match) -> dict:
        picked = {r["mode"]: r.get(key) for r in rows if all(r[k] == v for k, v in match.items())}
        return {"value": picked["cuda_graph"], "eager": picked["eager"]}

    for shape, targets in TARGETS.items():
        if shape not in measured:
            continue
        found[f"{shape}_dense_vs_flashinfer"] = {**speedups("vs_flashinfer", shape=shape, impl="ucm_dense_decode"),
                                           "target_at_least": targets["dense_vs_flashinfer"]}
        for selection in SELECTIONS:
            if f"{selection}_speedup" not in targets:
                continue
            for rule in RULES:
                for name in ("select_attend", *(f"select_attend_every{every}" for every in REUSE_EVERY)):
                    suffix = name.removeprefix("select_attend").removeprefix("_")
                    found[f"{shape}_{selection}_{rule}{'_' + suffix if suffix else ''}_speedup"] = {
                        **speedups(shape=f"{shape}_{selection}", name=name, impl=f"ucm_{rule}"),
                        "target_at_least": targets[f"{selection}_speedup"]}
    return found


def print_table(rows: list[dict], skipped: list[str], ceilings: dict) -> None:
    print(f"ceilings measured in this run: {ceilings}")
    print(f"{'shape':<24}{'name':<24}{'impl':<18}{'mode':<11}{'ms':>8}{'GB/s':>9}{'%ceil':>7}{'speedup':>8}")
    for r in rows:
        print(f"{r['shape']:<24}{r['name']:<24}{r['impl']:<18}{r['mode']:<11}{r['median_ms']:>8.4f}"
              f"{r.get('gbps', ''):>9}{r.get('pct_of_ceiling', ''):>7}{r.get('speedup_vs_baseline', ''):>8}")
    for line in skipped:
        print("skipped:", line)


def save(rows: list[dict], ceilings: dict, skipped: list[str], pending: list[str]):
    """Write the results so far (rewritten after every shape, so a run cut short keeps its finished shapes)."""
    return write_results("sparse_decode", rows, ceilings, extra={
        "config": {"num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                   "block_size": BLOCK_SIZE, "dtype": str(DTYPE), **WINDOWS, "selections": SELECTIONS,
                   "rules": {f"ucm_{rule}": score for rule, score in RULES.items()},
                   "fp8_reprs": "float8_e4m3fn kmin/kmax/kmean + fp32 kscale per (block, KV head)",
                   "flashinfer": FLASHINFER or "not installed: no FlashInfer rows"},
        "timing": "triton.testing.do_bench median, L2 cleared before every call; mode cuda_graph: replay of the "
                  "call captured in a CUDA graph (GPU time), mode eager: the Python call (host launch work included); "
                  "plans made once per step, outside the timed call",
        "targets": verdicts(rows), "skipped": skipped, "not_yet_run": pending})


def main() -> None:
    torch.manual_seed(0)
    ceilings = measure_copy_ceilings()
    rows, skipped = [], []
    path = save(rows, ceilings, skipped, [f"b{b}_ctx{c}" for b, c in SHAPES])
    for i, (batch, context) in enumerate(SHAPES):
        free = torch.cuda.mem_get_info()[0]
        if bytes_needed(batch, context) > free:
            skipped.append(f"b{batch}_ctx{context}: needs ~{bytes_needed(batch, context) / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free")
            continue
        case = build_case(batch, context)
        check_case(case)
        rows += bench_case(case, ceilings["hbm_copy_gbps"])
        del case
        torch.cuda.empty_cache()
        path = save(rows, ceilings, skipped, [f"b{b}_ctx{c}" for b, c in SHAPES[i + 1:]])
        print(f"b{batch}_ctx{context} done", flush=True)
    print_table(rows, skipped, ceilings)
    for name, verdict in verdicts(rows).items():
        print(f"target {name}: {verdict}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
