"""Whole decode steps of a Llama-8B-like model: GSA as vLLM runs it on the GPU against dense attention, same step.

Model (MODEL): 32 layers, hidden 4096, 32 query / 8 KV heads, head_dim 128, SwiGLU MLP 14336, vocab 128256, bf16
random weights. A layer: RMSNorm, QKV projection, the new token's K/V written into the paged cache, attention,
O projection, RMSNorm, MLP; then the final norm, the LM head and a greedy argmax. RoPE is left out (elementwise,
the same work in every variant). Attention variants, each inside the same step:

* ``flashinfer``: FlashInfer's tensor-core paged decode (its faster kernel at these shapes, bench_sparse_decode)
  over NHD K/V caches;
* ``ucm_dense``: our dense_decode over the FlashAttention-layout cache vLLM allocates;
* ``gsa_every{N}``, ``gsa_fp8_every4``, ``gsa_budget2048[_every{N}]``, ``gsa_rerank2_every{N}``: FlashGSA
  (:class:`ucm_sparse.vllm.flash_step.FlashGSA`), the code of GSA's vLLM backend: its plan made eagerly per step (as
  vLLM's metadata builder makes it), then each layer refreshes its summaries, selects (with ``select_every`` N > 1
  only the rows whose lists are due) and attends. Quest (bf16 or fp8 summaries), sparse_ratio 0.3 or a 2048-token
  budget, or two stages (Quest at 0.6 as candidates, 0.3 kept by exact attention), block 16 (GSA_VARIANTS).

Every variant runs all layers in one CUDA graph per step shape, replayed per step after that step's host work.
The KV cache is one tensor shared by every layer (8 x 128K tokens x 32 layers would need 137 GB): each layer
still reads its KV (or its selection) from HBM, since one layer's share (0.5-4 GB at 128K) is far beyond the 50 MB
L2, and has its own queries, so its own selection; the block summaries are shared too (they summarise the same
keys). Each step grows the running requests by one token (lengths and the new token's slot advanced on the
device, no host copy in the loop), so blocks fill and GSA reselects as in serving. FlashInfer is planned once per
group at the start length (the STEPS tokens added change its work by < 0.2%); taking turns re-plans it each step
(its plan's host work is then part of its step, as in vLLM).

Schedules: ``steady`` (B requests decode every step) and ``alternating`` (two groups of B/2 take turns, as
pipeline-parallel micro-batches do: a step runs B/2 rows). tokens/s = rows per step x steps / wall time of STEPS
steps (host work included, as a server sees it).

Before timing, per shape: one layer's attention of each dense variant and of GSA at sparse_ratio 1.0 (every block
listed) against torch SDPA, and that GSA's whole step against ``ucm_dense``'s (logits within the rounding spread
of the dense kernels over 32 layers; the share of argmax tokens that agree is recorded).

Usage (lent GPU): ``python -m bench.bench_decode_step``; JSON under $OUT or bench/results/. ``--smoke`` runs a tiny
model on the CPU (Triton interpreter, eager, no FlashInfer) through the same code.
"""
import argparse
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench import flashinfer_peer
from bench.bench_sparse_decode import MAX_REL_ERROR, check
from bench.harness import measure_copy_ceilings, row, write_results
from ucm_kernels.block_repr import update_block_repr
from ucm_kernels.sparse_decode import dense_decode, plan_decode
from ucm_sparse import GSAConfig
from ucm_sparse.vllm.flash_step import FlashGSA, LayerState, flash_kv_views

BLOCK = 16
GSA_SETTINGS = dict(sparse_ratio=0.3, init_window_sz=1, local_window_sz=4, min_blocks=8)
# GSA variants timed per shape: Quest at sparse_ratio 0.3 selecting every 1 / 4 / 8 steps (every 4 on fp8 summaries
# too), a 2048-token budget (the same windows) every 1 / 4 / 8 steps, and two stages at 0.3 every 4 / 8 steps
BUDGET = {"token_budget": 2048}
RERANK = {"rerank_candidates": 2.0}  # two stages: Quest at 0.6 as candidates, 0.3 kept by exact attention
GSA_VARIANTS = {"gsa_every1": {}, "gsa_every4": {"select_every": 4}, "gsa_every8": {"select_every": 8},
                "gsa_fp8_every4": {"repr_dtype": "fp8", "select_every": 4}, "gsa_budget2048": BUDGET,
                "gsa_budget2048_every4": {**BUDGET, "select_every": 4},
                "gsa_budget2048_every8": {**BUDGET, "select_every": 8},
                "gsa_rerank2_every4": {**RERANK, "select_every": 4},
                "gsa_rerank2_every8": {**RERANK, "select_every": 8}}
SHAPES = [(8, 131072, "steady"), (8, 131072, "alternating"), (1, 131072, "steady"), (8, 32768, "steady"),
          (8, 32768, "alternating"), (1, 32768, "steady")]
STEPS = 48
TARGETS = {"b8_ctx131072": 2.0, "b1_ctx131072": 1.5}  # issue 18: GSA tokens/s over the faster dense


@dataclasses.dataclass(frozen=True)
class Model:
    layers: int = 32
    hidden: int = 4096
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    mlp: int = 14336
    vocab: int = 128256


MODEL = Model()
SMOKE = Model(layers=2, hidden=256, q_heads=4, kv_heads=2, head_dim=64, mlp=512, vocab=1000)


class Weights:
    """Random bf16 weights of ``model`` (std 0.02, unit norms), one set per layer."""

    def __init__(self, model: Model, device: str):
        gen = torch.Generator(device=device).manual_seed(0)

        def mat(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=gen, device=device) * 0.02).to(torch.bfloat16)

        self.qkv = [mat(model.hidden, (model.q_heads + 2 * model.kv_heads) * model.head_dim)
                    for _ in range(model.layers)]
        self.o = [mat(model.q_heads * model.head_dim, model.hidden) for _ in range(model.layers)]
        self.gate_up = [mat(model.hidden, 2 * model.mlp) for _ in range(model.layers)]
        self.down = [mat(model.mlp, model.hidden) for _ in range(model.layers)]
        self.lm_head = mat(model.hidden, model.vocab)
        self.norm = torch.ones(model.hidden, dtype=torch.bfloat16, device=device)


@dataclasses.dataclass
class Group:
    """Requests that decode together: table ``[rows, max_blocks]`` int32 and lengths ``[rows]`` int32 (device)."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor


@dataclasses.dataclass
class Batch:
    """The fixed buffers of one step shape (its CUDA graph reads them): ``rows`` rows."""

    x: torch.Tensor  # [rows, hidden] the step's input activations
    seq_lens: torch.Tensor  # [rows] int32
    block_table: torch.Tensor  # [rows, max_blocks] int32
    slot: torch.Tensor  # [2, rows] int64: physical block and offset of the new token
    logits: torch.Tensor | None = None  # [rows, vocab], written by the step

    def stage(self, group: Group) -> None:
        """The group's lengths, table and new-token slots into the buffers (device copies only)."""
        self.seq_lens.copy_(group.seq_lens)
        self.block_table.copy_(group.block_table)
        position = (group.seq_lens - 1).long()
        self.slot[0].copy_(group.block_table.gather(1, (position // BLOCK)[:, None])[:, 0])
        self.slot[1].copy_(position % BLOCK)


@dataclasses.dataclass
class Variant:
    """An attention variant: ``attend(layer, q [rows, q_heads, head_dim]) -> out`` inside the step, and the host
    work ``prepare(group)`` before each step."""

    name: str
    attend: Callable[[int, torch.Tensor], torch.Tensor]
    prepare: Callable[[Group], None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, 1e-5)


def forward(model: Model, weights: Weights, batch: Batch, caches: list, attend) -> None:
    """One decode step of the whole model over ``batch``: writes ``batch.logits``."""
    rows, h = batch.x.shape[0], batch.x
    q_size, kv_size = model.q_heads * model.head_dim, model.kv_heads * model.head_dim
    where = (batch.slot[0], batch.slot[1])
    for layer in range(model.layers):
        q, k, v = (rms_norm(h, weights.norm) @ weights.qkv[layer]).split([q_size, kv_size, kv_size], dim=-1)
        for key_cache, value_cache in caches:
            key_cache.index_put_(where, k.view(rows, model.kv_heads, model.head_dim))
            value_cache.index_put_(where, v.view(rows, model.kv_heads, model.head_dim))
        attn = attend(layer, q.reshape(rows, model.q_heads, model.head_dim))
        h = h + attn.reshape(rows, q_size) @ weights.o[layer]
        gate, up = (rms_norm(h, weights.norm) @ weights.gate_up[layer]).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ weights.down[layer]
    batch.logits = rms_norm(h, weights.norm) @ weights.lm_head


def captured(fn: Callable[[], None], graphs: bool) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph after a warm-up call (its replay returned), or ``fn`` itself."""
    if not graphs:
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Setup:
    """One shape: the model's groups, caches and step buffers."""

    def __init__(self, model: Model, weights: Weights, rows: int, context: int, schedule: str, device: str,
                 flashinfer: bool):
        self.model, self.weights, self.context, self.device = model, weights, context, device
        groups = 2 if schedule == "alternating" else 1
        self.rows = rows // groups
        width = -(-(context + 2 * STEPS + 4) // BLOCK)
        self.num_blocks = groups * self.rows * width + 1
        physical = torch.randperm(self.num_blocks - 1, device=device).view(groups, self.rows, width) + 1
        self.start = [Group(physical[g].int(), torch.full((self.rows,), context, dtype=torch.int32, device=device))
                      for g in range(groups)]
        flash = torch.randn(self.num_blocks, model.kv_heads, BLOCK, 2 * model.head_dim, dtype=torch.bfloat16,
                            device=device)
        self.flash = flash
        self.caches = {"flash": flash_kv_views(flash, model.head_dim)}
        if flashinfer:
            self.caches["nhd"] = tuple(view.contiguous() for view in self.caches["flash"])
        self.batch = Batch(torch.randn(self.rows, model.hidden, dtype=torch.bfloat16, device=device),
                           torch.zeros(self.rows, dtype=torch.int32, device=device),
                           torch.zeros(self.rows, width, dtype=torch.int32, device=device),
                           torch.zeros(2, self.rows, dtype=torch.long, device=device))
        self.batch.stage(self.start[0])

    def groups(self) -> list[Group]:
        """Fresh copies of the groups at their start lengths (each variant decodes from the same state)."""
        return [Group(g.block_table, g.seq_lens.clone()) for g in self.start]

    def q_like(self) -> torch.Tensor:
        return torch.empty(self.rows, self.model.q_heads, self.model.head_dim, dtype=torch.bfloat16,
                           device=self.device)


def ucm_dense(setup: Setup) -> Variant:
    keys, values = setup.caches["flash"]
    plan = plan_decode(setup.q_like(), keys, setup.batch.block_table.shape[1], dense=True)
    batch = setup.batch
    return Variant("ucm_dense", lambda layer, q: dense_decode(q, keys, values, batch.block_table, batch.seq_lens,
                                                             plan=plan), lambda group: None)


def flashinfer(setup: Setup) -> Variant:
    """FlashInfer's tensor-core decode, its page lists per group at the start lengths (host copies for its plan)."""
    model, keys_values = setup.model, setup.caches["nhd"]
    pages = []
    for group in setup.start:
        indptr, indices, last_page_len = flashinfer_peer.dense_pages(group.block_table, group.seq_lens, BLOCK)
        pages.append((indptr.cpu(), indices, last_page_len.cpu()))
    peer = flashinfer_peer.PagedDecode(*(t.to(setup.device).clone() for t in pages[0]), num_q_heads=model.q_heads,
                                       num_kv_heads=model.kv_heads, head_dim=model.head_dim, page_size=BLOCK,
                                       dtype=torch.bfloat16, tensor_cores=True)
    planned = {"group": 0}

    def prepare(group: Group) -> None:
        index = next(i for i, g in enumerate(setup.start) if g.block_table is group.block_table)
        if index != planned["group"]:
            peer.replan(*pages[index])
            planned["group"] = index

    return Variant("flashinfer", lambda layer, q: peer.run(q, *keys_values), prepare)


def gsa(setup: Setup, config: GSAConfig, name: str) -> Variant:
    """FlashGSA over the FlashAttention cache: its plan per step, one LayerState per layer (shared summaries,
    computed for every block first as a prefill leaves them; each layer its own kept lists)."""
    model, batch = setup.model, setup.batch
    step = FlashGSA(config, block_size=BLOCK, num_kv_heads=model.kv_heads, num_q_heads=model.q_heads,
                    head_size=model.head_dim, max_rows=setup.rows, dtype=torch.bfloat16, device=setup.device)
    first = step.layer_state(setup.num_blocks)
    update_block_repr(setup.caches["flash"][0], torch.arange(setup.num_blocks, device=setup.device), *first.reprs)
    layers = [first] + [LayerState(first.reprs, step.layer_state(1).selections) for _ in range(model.layers - 1)]
    starts = torch.arange(setup.rows + 1, dtype=torch.int32)
    starts_device = starts.to(setup.device)
    state = {}

    def prepare(group: Group) -> None:
        state["plan"] = step.plan(batch.seq_lens, starts_device, starts, batch.block_table, 1)

    def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        step.run(state["plan"], q, setup.flash, layers[layer], model.head_dim ** -0.5, out)
        return out

    prepare(setup.start[0])
    return Variant(name, attend, prepare)


def decode_steps(setup: Setup, variant: Variant, steps: int, graphs: bool, profiler=None
                 ) -> tuple[float, torch.Tensor]:
    """Seconds per step over ``steps`` steps of ``variant`` (groups taking turns), and the last step's logits;
    ``profiler`` (a torch profiler) records the timed steps."""
    groups = setup.groups()
    setup.batch.stage(groups[0])
    variant.prepare(groups[0])
    run = captured(lambda: forward(setup.model, setup.weights, setup.batch, list(setup.caches.values()),
                                   variant.attend), graphs)
    sync = torch.cuda.synchronize if graphs else (lambda: None)
    sync()
    if profiler is not None:
        profiler.start()
    start = time.perf_counter()
    for i in range(steps):
        group = groups[i % len(groups)]
        setup.batch.stage(group)
        variant.prepare(group)
        run()
        group.seq_lens += 1
    sync()
    seconds = (time.perf_counter() - start) / steps
    if profiler is not None:
        profiler.stop()
    return seconds, setup.batch.logits


def kernel_profile(setup: Setup, variant: Variant, steps: int) -> list[dict]:
    """The 16 GPU kernels with the most device time over ``steps`` graph-replayed steps, microseconds per step."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    decode_steps(setup, variant, steps, True, prof)
    kernels = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0),
                     key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "calls_per_step": e.count / steps,
             "us_per_step": round(e.self_device_time_total / steps, 1)} for e in kernels[:16]]


def check_attention(setup: Setup, variants: list[Variant]) -> None:
    """Each variant's one-layer attention against torch SDPA over the gathered K/V."""
    model, batch = setup.model, setup.batch
    batch.stage(setup.start[0])
    keys, values = setup.caches["flash"]
    blocks = -(-setup.context // BLOCK)
    table = batch.block_table[:, :blocks].long()
    k, v = (cache[table].flatten(1, 2)[:, :setup.context].transpose(1, 2) for cache in (keys, values))
    q = torch.randn(setup.rows, model.q_heads, model.head_dim, dtype=torch.bfloat16, device=setup.device)
    expected = F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    del k, v
    for variant in variants:
        variant.prepare(setup.start[0])
        check(f"b{setup.rows} ctx{setup.context} {variant.name} attention vs SDPA", variant.attend(0, q), expected)


def step_logits(setup: Setup, variant: Variant, graphs: bool) -> torch.Tensor:
    """fp32 logits of one whole step of ``variant`` from the start lengths."""
    return decode_steps(setup, variant, 1, graphs)[1].float().clone()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def check_gsa_dense_lists(setup: Setup, dense: list[Variant], everything: Variant, graphs: bool) -> dict:
    """A whole step of GSA listing every block against ``ucm_dense``: its logits may differ by rounding (kernels
    summing in another order, 32 layers deep) as much as the other dense kernel's do, or MAX_REL_ERROR if more;
    returns the errors and the tokens that agree."""
    reference = step_logits(setup, dense[0], graphs)
    spread = {v.name: rel_error(step_logits(setup, v, graphs), reference) for v in dense[1:]}
    gsa_logits = step_logits(setup, everything, graphs)
    error, allowed = rel_error(gsa_logits, reference), max([MAX_REL_ERROR] + [2 * e for e in spread.values()])
    if not torch.isfinite(gsa_logits).all() or error > allowed:
        raise AssertionError(f"b{setup.rows} ctx{setup.context}: GSA listing every block, whole-step logits "
                             f"relative error {error:.2e} against ucm_dense (allowed {allowed:.2e}; dense peers "
                             f"{spread})")
    agree = (gsa_logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {"gsa_all_blocks_logits_rel_error": round(error, 5), "dense_peer_logits_rel_error": spread,
            "gsa_all_blocks_tokens_agree": agree}


def bench_shape(model: Model, weights: Weights, rows: int, context: int, schedule: str, device: str, steps: int,
                graphs: bool, use_flashinfer: bool) -> list[dict]:
    setup = Setup(model, weights, rows, context, schedule, device, use_flashinfer)
    dense = [ucm_dense(setup)] + ([flashinfer(setup)] if use_flashinfer else [])
    everything = gsa(setup, GSAConfig(**{**GSA_SETTINGS, "sparse_ratio": 1.0}), "gsa_all_blocks")
    check_attention(setup, dense + [everything])
    checked = check_gsa_dense_lists(setup, dense, everything, graphs)
    variants = dense + [gsa(setup, GSAConfig(**{**GSA_SETTINGS, **keys}), name) for name, keys in GSA_VARIANTS.items()]
    seconds = {v.name: decode_steps(setup, v, steps, graphs)[0] for v in variants}
    best_dense = min(seconds[v.name] for v in dense)
    shape = f"b{rows}_ctx{context}"
    return [row("decode_step", name, shape, s * 1e3, schedule=schedule, rows_per_step=setup.rows,
                tokens_per_s=round(setup.rows / s, 1), speedup_vs_faster_dense=round(best_dense / s, 3),
                steps=steps, layers=model.layers, **checked) for name, s in seconds.items()]


def verdicts(rows: list[dict]) -> dict:
    found = {}
    for shape, target in TARGETS.items():
        for r in rows:
            if r["shape"] == shape and r["impl"].startswith("gsa"):
                found[f"{shape}_{r['schedule']}_{r['impl']}"] = {"value": r["speedup_vs_faster_dense"],
                                                                "target_at_least": target}
    return found


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (Triton interpreter)")
    parser.add_argument("--profile", action="store_true",
                        help="only 1 x 128K: the kernels of 8 steps of ucm_dense and of gsa_every4 (GPU)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.profile:
        return profile_batch1()
    if args.smoke:
        model, device, shapes, steps, graphs = SMOKE, "cpu", [(2, 512, "steady"), (2, 512, "alternating")], 2, False
    else:
        model, device, shapes, steps, graphs = MODEL, "cuda", SHAPES, STEPS, True
    use_flashinfer = graphs and flashinfer_peer.available() is not None
    weights = Weights(model, device)
    rows = []
    for batch, context, schedule in shapes:
        shape_rows = bench_shape(model, weights, batch, context, schedule, device, steps, graphs, use_flashinfer)
        for r in shape_rows:
            print(r, flush=True)
        rows += shape_rows
        if not args.smoke:
            torch.cuda.empty_cache()
    if not args.smoke:
        found = verdicts(rows)
        path = write_results("decode_step", rows, measure_copy_ceilings(), extra={
            "targets": found, "model": dataclasses.asdict(model), "gsa": GSA_SETTINGS, "steps": steps,
            "flashinfer": flashinfer_peer.available()})
        for name, verdict in found.items():
            print(f"target {name}: {verdict}")
        print(f"results: {path}")
    return rows


def profile_batch1() -> list[dict]:
    """Where a 1 x 128K step's time goes: kernel tables of ucm_dense and of GSA with select_every 4."""
    setup = Setup(MODEL, Weights(MODEL, "cuda"), 1, 131072, "steady", "cuda", False)
    rows = [{"impl": variant.name, "kernels": kernel_profile(setup, variant, 8)}
            for variant in (ucm_dense(setup), gsa(setup, GSAConfig(**GSA_SETTINGS, select_every=4), "gsa_every4"))]
    print(write_results("decode_step_profile", rows, {}, extra={"shape": "b1_ctx131072", "steps": 8}))
    for r in rows:
        for kernel in r["kernels"]:
            print(r["impl"], kernel)
    return rows


if __name__ == "__main__":
    main()
