"""GSA selection quality against dense attention in the same run: attention-mass recall, output error, needle hits.

Three synthetic decode workloads, bf16 KV, 32 query / 8 KV heads, head_dim 128, block_size 16 (Llama-like GQA):

* ``needle``: background keys in topic chunks (keys of a chunk share a direction; token noise on top) and, per
  (request, KV head), 3 needle keys at random depths outside the windows, each strongly aligned with the group's
  query (query . key / sqrt(d) about ``NEEDLE_LOGIT`` above the background, as a retrieval head sees it).
* ``structured``: attention with realistic structure, drawn per (request, KV head): 4 sink tokens with a large
  logit, a strong local band (a recency direction whose weight decays over ~``LOCAL_TAU`` tokens before the
  current one), and heavy-tailed scores over topic chunks (Student-t weights, a few topics dominate).
* ``diffuse``: ``structured`` with weaker topic logits (flatter attention; a robustness check, no target).

For each sparse_ratio in 0.1, 0.2, 0.3, 0.5 and both scoring rules (``quest`` upper bound, ``mean`` key) GSA runs
through ``ucm_sparse.sparse_attention`` and is compared with dense attention from the same call path at
sparse_ratio 1.0. Per (request, query head): attention-mass recall (the dense softmax mass on the tokens of the
selected blocks, fp32), relative L2 error of the output; per needle: whether its block was selected.

Usage: ``python -m bench.sparse_quality [--contexts 16384 65536] [--batch 4] [--trials 2] [--out DIR]``; runs on
CUDA (Triton kernels) when available, else on the CPU (torch ops, default context 16384 only). Writes
``sparse_quality-<device>-<date>.json`` and ``.png`` under ``--out``, ``$OUT`` or ``bench/results/``.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.harness import write_results
from ucm_sparse import GSAConfig, sparse_attention

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
GROUP = NUM_Q_HEADS // NUM_KV_HEADS
RATIOS = (0.1, 0.2, 0.3, 0.5)
RULES = {"quest": dict(score="quest"), "quest_fp8": dict(score="quest", repr_dtype="fp8"),
         "mean": dict(score="mean")}  # selection rule name -> its GSAConfig keys
WINDOWS = dict(init_window_sz=1, local_window_sz=4, min_blocks=8)
NEEDLES_PER_HEAD = 3
NEEDLE_LOGIT = 12.0  # a needle's logit above the background's: it takes most of its head's attention
CHUNK_TOKENS = 64  # mean length of a topic chunk (geometric)
TOKEN_NOISE = 0.5  # per-channel token noise against a topic component of 1 per channel
LOCAL_TAU = 48.0  # tokens over which the local band's logit boost decays by e
SINK_LOGIT, LOCAL_LOGIT = (4.0, 9.0), (2.0, 6.0)  # per-head ranges of logit boosts
TOPIC_LOGIT = {"structured": (0.4, 0.8), "diffuse": (0.3, 0.7)}  # per-head range of the topic logit scale
TOPIC_CLIP = 12.0  # Student-t(1.5) topic weights clipped to this (times TOPIC_LOGIT: the largest topic logit)
TARGETS = {"sparse_ratio": 0.3, "mass_recall": 0.95, "needle_hit_rate": 1.0}


@dataclass
class Case:
    """A decode batch: queries, paged K/V (identity block table), lengths, and needle positions (b, kv_head, t)."""

    q: torch.Tensor  # [batch, NUM_Q_HEADS, HEAD_DIM]
    key_cache: torch.Tensor  # [batch * context / BLOCK_SIZE, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM]
    value_cache: torch.Tensor
    block_table: torch.Tensor  # [batch, context / BLOCK_SIZE] int32
    seq_lens: torch.Tensor  # [batch] int32
    needles: list = field(default_factory=list)

    @property
    def context(self) -> int:
        return self.block_table.shape[1] * BLOCK_SIZE


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def topic_keys(batch: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[batch, context, heads, dim]`` = a shared bias + the direction of the token's topic chunk (norm
    sqrt(dim)) + token noise; and the unit topic directions ``[batch, topics, heads, dim]``."""
    topics = context // CHUNK_TOKENS * 2 + 2
    directions = unit(torch.randn(batch, topics, NUM_KV_HEADS, HEAD_DIM, generator=gen))
    lengths = torch.distributions.Geometric(probs=torch.tensor(1.0 / CHUNK_TOKENS)).sample((batch, topics)) + 1
    keys = torch.randn(batch, 1, NUM_KV_HEADS, HEAD_DIM, generator=gen).expand(batch, context, -1, -1).clone()
    for b in range(batch):
        chunk = torch.repeat_interleave(torch.arange(topics), lengths[b].long())[:context]
        keys[b] += math.sqrt(HEAD_DIM) * directions[b, chunk]
    keys += TOKEN_NOISE * torch.randn(batch, context, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    return keys, directions


def group_queries(centre: torch.Tensor, gen: torch.Generator, spread: float = 0.3) -> torch.Tensor:
    """``[batch, NUM_Q_HEADS, HEAD_DIM]``: each KV head's ``centre`` (``[batch, heads, dim]``) plus per-head noise
    of ``spread`` times its norm (the query heads of a GQA group look alike, not the same)."""
    noise = unit(torch.randn(*centre.shape[:2], GROUP, HEAD_DIM, generator=gen))
    heads = centre[:, :, None] + spread * centre.norm(dim=-1, keepdim=True)[..., None] * noise
    return heads.reshape(centre.shape[0], NUM_Q_HEADS, HEAD_DIM)


def needle_case(batch: int, context: int, gen: torch.Generator) -> Case:
    """Topic-chunk background, random queries, NEEDLES_PER_HEAD keys per KV head aligned with its queries."""
    keys, _ = topic_keys(batch, context, gen)
    q = group_queries(torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, generator=gen), gen)
    centre = q.view(batch, NUM_KV_HEADS, GROUP, HEAD_DIM).mean(dim=2)
    margin = (WINDOWS["init_window_sz"] + WINDOWS["local_window_sz"]) * BLOCK_SIZE
    needles = []
    for b in range(batch):
        for h in range(NUM_KV_HEADS):
            for t in torch.randint(margin, context - margin, (NEEDLES_PER_HEAD,), generator=gen).tolist():
                keys[b, t, h] += NEEDLE_LOGIT * math.sqrt(HEAD_DIM) / centre[b, h].norm() * unit(centre[b, h])
                needles.append((b, h, t))
    return paged(q, keys, torch.randn(keys.shape, generator=gen), needles)


def structured_case(batch: int, context: int, gen: torch.Generator, topic_logit: tuple = TOPIC_LOGIT["structured"]
                    ) -> Case:
    """Sinks, a local band and heavy-tailed topic scores, with strengths drawn per (request, KV head)."""
    keys, directions = topic_keys(batch, context, gen)
    shape = (batch, NUM_KV_HEADS, HEAD_DIM)
    sink, recent = unit(torch.randn(shape, generator=gen)), unit(torch.randn(shape, generator=gen))
    keys[:, :4] += 3 * math.sqrt(HEAD_DIM) * sink[:, None]
    distance = torch.arange(context - 1, -1, -1, dtype=torch.float32)
    keys += 3 * math.sqrt(HEAD_DIM) * torch.exp(-distance / LOCAL_TAU)[None, :, None, None] * recent[:, None]
    weights = torch.distributions.StudentT(1.5).sample(directions.shape[:3]).clamp(-TOPIC_CLIP, TOPIC_CLIP)

    def strength(low: float, high: float) -> torch.Tensor:  # one draw per (request, KV head)
        return low + (high - low) * torch.rand(batch, NUM_KV_HEADS, 1, generator=gen)

    # Logit boosts (query . key / sqrt(dim)): a topic's TOPIC_LOGIT x its Student-t weight, sinks SINK_LOGIT, the
    # newest token LOCAL_LOGIT; the sink and recency key components have norm 3 sqrt(dim), the topic ones sqrt(dim).
    centre = (strength(*topic_logit) * torch.einsum("bch,bchd->bhd", weights, directions)
              + strength(*LOCAL_LOGIT) / 3 * recent + strength(*SINK_LOGIT) / 3 * sink)
    return paged(group_queries(centre, gen), keys, torch.randn(keys.shape, generator=gen))


def diffuse_case(batch: int, context: int, gen: torch.Generator) -> Case:
    """:func:`structured_case` with weaker topic logits: flatter attention, a harder case for any selection."""
    return structured_case(batch, context, gen, TOPIC_LOGIT["diffuse"])


def paged(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, needles: list | None = None) -> Case:
    """Requests' contiguous K/V as a paged cache (block table = identity), in DTYPE on the bench device."""
    batch, context = keys.shape[:2]
    nb = context // BLOCK_SIZE
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def cache(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch * nb, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).to(device, DTYPE)

    table = torch.arange(batch * nb, dtype=torch.int32, device=device).view(batch, nb)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return Case(q.to(device, DTYPE), cache(keys), cache(values), table, lens, needles or [])


SCENARIOS = {"needle": needle_case, "structured": structured_case, "diffuse": diffuse_case}


def dense_probabilities(case: Case) -> torch.Tensor:
    """fp32 softmax ``[batch, NUM_Q_HEADS, context]`` of every query head over its request's tokens."""
    batch, nb = case.block_table.shape
    keys = case.key_cache.view(batch, nb * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM).float()
    q = case.q.float().view(batch, NUM_KV_HEADS, GROUP, HEAD_DIM)
    logits = torch.einsum("bhgd,bthd->bhgt", q, keys) * HEAD_DIM ** -0.5
    return torch.softmax(logits, dim=-1).reshape(batch, NUM_Q_HEADS, -1)


def measure(case: Case, probs: torch.Tensor, dense_out: torch.Tensor, config: GSAConfig) -> dict:
    """Recall, output error and needle hits of one GSA configuration on ``case``."""
    out, selection = sparse_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens,
                                      config)
    batch, nb = case.block_table.shape
    chosen = torch.zeros(batch, NUM_KV_HEADS, nb + 1, dtype=torch.bool, device=probs.device)
    chosen.scatter_(2, torch.where(selection.sel_idx >= 0, selection.sel_idx, nb).long(), True)
    token_chosen = chosen[..., :nb].repeat_interleave(GROUP, dim=1).repeat_interleave(BLOCK_SIZE, dim=2)
    recall = (probs * token_chosen).sum(dim=-1).flatten()
    error = ((out.float() - dense_out.float()).norm(dim=-1) / dense_out.float().norm(dim=-1)).flatten()
    hits = [bool(chosen[b, h, t // BLOCK_SIZE]) for b, h, t in case.needles]
    return {"recall": recall.cpu(), "error": error.cpu(), "hits": hits,
            "attended": float(selection.sel_count.float().mean() / nb)}


def summarize(scenario: str, context: int, rule: str, ratio: float, parts: list[dict], seconds: float) -> dict:
    recall = torch.cat([p["recall"] for p in parts])
    error = torch.cat([p["error"] for p in parts])
    hits = [h for p in parts for h in p["hits"]]
    out = {"name": scenario, "impl": f"gsa_{rule}", "shape": f"ctx{context}_b{parts[0]['batch']}",
           "sparse_ratio": ratio, "blocks_attended": round(sum(p["attended"] for p in parts) / len(parts), 4),
           "mass_recall_mean": round(recall.mean().item(), 4),
           "mass_recall_p05": round(recall.quantile(0.05).item(), 4), "mass_recall_min": round(recall.min().item(), 4),
           "rel_error_mean": round(error.mean().item(), 5), "rel_error_p95": round(error.quantile(0.95).item(), 5),
           "samples": recall.numel(), "seconds": round(seconds, 2)}
    if hits:
        out["needle_hit_rate"] = round(sum(hits) / len(hits), 4)
        out["needles"] = len(hits)
    return out


def sweep(contexts: list[int], batch: int, trials: int, seed: int = 0) -> list[dict]:
    """Every scenario x context x selection rule x ratio, each over ``trials`` freshly drawn batches."""
    rows = []
    for scenario, make in SCENARIOS.items():
        for context in contexts:
            results: dict[tuple, list] = {}
            for trial in range(trials):
                gen = torch.Generator().manual_seed(seed + 1000 * trial + context)
                torch.manual_seed(seed + 1000 * trial + context)  # torch.distributions samples draw from it
                case = make(batch, context, gen)
                probs = dense_probabilities(case)
                dense_out, _ = sparse_attention(case.q, case.key_cache, case.value_cache, case.block_table,
                                                case.seq_lens, GSAConfig(sparse_ratio=1.0, **WINDOWS))
                for rule, keys in RULES.items():
                    for ratio in RATIOS:
                        start = time.perf_counter()
                        part = measure(case, probs, dense_out, GSAConfig(sparse_ratio=ratio, **keys, **WINDOWS))
                        part.update(batch=batch, seconds=time.perf_counter() - start)
                        results.setdefault((rule, ratio), []).append(part)
            for (rule, ratio), parts in results.items():
                rows.append(summarize(scenario, context, rule, ratio, parts, sum(p["seconds"] for p in parts)))
    return rows


def check_targets(rows: list[dict]) -> dict:
    """Per scenario with a target and rule at TARGETS' ratio (every context): recall and needle hit rate."""
    verdicts = {}
    for row in rows:
        if row["sparse_ratio"] != TARGETS["sparse_ratio"] or row["name"] == "diffuse":
            continue
        key = f"{row['name']}/{row['impl']}"
        ok = row["mass_recall_mean"] >= TARGETS["mass_recall"]
        if "needle_hit_rate" in row:
            ok = ok and row["needle_hit_rate"] >= TARGETS["needle_hit_rate"]
        verdicts[key] = verdicts.get(key, True) and ok
    return verdicts


LINE_STYLES = {"gsa_quest": "-", "gsa_quest_fp8": ":", "gsa_mean": "--"}


def plot(rows: list[dict], path: Path) -> None:
    """Recall, output error and needle hit rate against sparse_ratio, one line per scenario x rule x context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("mass_recall_mean", "attention-mass recall", "linear"),
              ("rel_error_mean", "output rel. L2 error", "log"), ("needle_hit_rate", "needle hit rate", "linear"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = dict(zip(SCENARIOS, ("tab:red", "tab:blue", "tab:green")))
    markers = dict(zip(sorted({row["shape"] for row in rows}), "osD^v"))
    series: dict[tuple, list] = {}
    for row in rows:
        series.setdefault((row["name"], row["impl"], row["shape"]), []).append(row)
    for ax, (metric, label, yscale) in zip(axes, panels):
        for (name, impl, shape), points in sorted(series.items()):
            points = [p for p in points if metric in p]
            if points:
                ax.plot([p["sparse_ratio"] for p in points], [p[metric] for p in points],
                        LINE_STYLES[impl], color=colors[name], marker=markers[shape],
                        label=f"{name} {impl[4:]} {shape}")
        ax.set(xlabel="sparse_ratio", ylabel=label, yscale=yscale, xticks=RATIOS)
        ax.grid(alpha=0.3)
    axes[0].axhline(TARGETS["mass_recall"], color="k", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle("GSA vs dense attention (bf16, 32q/8kv heads, d=128, block 16; init 1, local 4, min 8 blocks); "
                 "solid: quest, dotted: quest fp8 summaries, dashed: mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    print(f"{'scenario':<11}{'rule':<11}{'shape':<15}{'ratio':>6}{'recall':>9}{'p05':>8}{'rel_err':>10}{'needles':>9}")
    for r in rows:
        hit = f"{r['needle_hit_rate']:.3f}" if "needle_hit_rate" in r else "-"
        print(f"{r['name']:<11}{r['impl'][4:]:<11}{r['shape']:<15}{r['sparse_ratio']:>6}{r['mass_recall_mean']:>9.4f}"
              f"{r['mass_recall_p05']:>8.4f}{r['rel_error_mean']:>10.5f}{hit:>9}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--contexts", type=int, nargs="+", default=[16384, 65536] if gpu else [16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON and PNG")
    args = parser.parse_args(argv)
    for context in args.contexts:
        if context % BLOCK_SIZE or context < 4 * CHUNK_TOKENS:
            parser.error(f"--contexts: {context} must be a multiple of {BLOCK_SIZE} and at least {4 * CHUNK_TOKENS}")
    if args.out is not None:
        os.environ["OUT"] = str(args.out)
    rows = sweep(args.contexts, args.batch, args.trials, args.seed)
    verdicts = check_targets(rows)
    path = write_results("sparse_quality", rows, ceilings={}, extra={
        "targets": TARGETS, "targets_met": verdicts,
        "setup": {"num_q_heads": NUM_Q_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK_SIZE, "dtype": str(DTYPE), **WINDOWS, "needles_per_head": NEEDLES_PER_HEAD,
                  "needle_logit": NEEDLE_LOGIT, "chunk_tokens": CHUNK_TOKENS, "token_noise": TOKEN_NOISE,
                  "local_tau": LOCAL_TAU, "batch": args.batch, "trials": args.trials, "contexts": args.contexts}})
    plot(rows, path.with_suffix(".png"))
    print_table(rows)
    print("targets at sparse_ratio 0.3 (recall >= 0.95, needle hit rate 1.0):", verdicts)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return path


if __name__ == "__main__":
    main()
