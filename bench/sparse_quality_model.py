"""GSA quality on a real pretrained model: SmolLM2-135M-Instruct on real English texts, against its dense run.

Texts are files every install carries (license files, a package README, long docstring modules of the project's
dependencies), cut at fixed character ranges (:data:`TEXTS`); the sha256 of each text's token ids is recorded, and
a missing file or a changed hash stops the run, so results files compare. Each text is prefilled once with dense
SDPA over its first ``max(contexts)`` tokens; the window of context C is the first C tokens of that prefill (a
causal prefill's first C positions are the prefill of those C tokens), followed by E evaluation tokens of the
same text. Per window and context:

* dense: teacher-forced decode of the E evaluation tokens one per step (each step's next-token log-probs kept),
  and a greedy continuation of GREEDY_TOKENS decode steps after the prefill's own next token;
* every GSA setting (selection rule x block size x sparse_ratio or token_budget, through ``ucm_sparse.hf``, torch
  backend): the same two decodes from a copy of the prefill's KV cache. The greedy run stops at its first token
  that differs from dense's (the count of identical leading tokens is then known).

Per (context, setting), pooled over the windows' positions: perplexity ratio (GSA / dense, over the evaluation
tokens), mean next-token KL(dense || GSA), top-1 agreement with dense's argmax, the dense top-1/top-2 margin at
the positions that flip, and how many windows' greedy continuations equal dense's.

Largest context only: ``--oracle`` measures the oracle selection (per KV head the blocks of most dense attention
mass, GSA's count of them: the bound of any block-selection rule); ``--reuse`` GSAConfig's ``select_every`` 2 / 4 /
8 (a layer's selection reused for up to that many decode steps, reselected when a block fills); ``--drift`` the
same with the drift rule (``select_drift``: reselected sooner once the layer's queries turned), every 8 / 16 / 32
steps, each row with the share of layer steps that selected; ``--rerank`` a
two-stage selection (Quest's selection at 1.5-3x the ratio as candidates, GSA's count of them kept by the exact
attention over their keys: what reading the candidates' keys would buy); ``--score-rules`` block scores computed
from the same per-block key boxes (kmin / kmax) Quest reads, at ratios 0.2 and 0.3 (:data:`SCORE_RULES`: which
estimate of a block's attention mass ranks blocks closest to the oracle at no extra bytes read); ``--shared-lists``
one block list per request shared by its KV heads against per-head lists (the oracle's, Quest's and gauss's ranking
at 0.3: what one list, whose blocks a kernel reads as whole NHD token rows, costs); ``--investigate``
records, along dense decodes, the share of each layer's and head's attention
that the quest 0.3 selection keeps (a probe attention function), then measures remedies tried through GSAConfig:
the first layers dense, wider windows, block 16, a higher ratio of the same KV share.

Usage: ``python -m bench.sparse_quality_model [--contexts 2048,4096,8192] [--quick | --investigate | --oracle |
--reuse | --drift | --rerank | --score-rules | --shared-lists] [--out DIR]``;
CPU, fp32. Writes ``sparse_quality_model[_investigation]-<device>-<date>.json`` (and a ``.png`` of the main run)
under ``--out``, ``$OUT`` or ``bench/results/``.
"""
import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import ucm_sparse.hf as ucm_hf
from bench.harness import write_results
from bench.plots import _pyplot, _save, _title
from bench.sparse_quality import LINE_STYLES, RULES
from ucm_kernels.block_select.torch import gauss_shares as torch_gauss_shares
from ucm_sparse import GSAConfig, ops, sparse_attention
from ucm_sparse.models import fetch_model
from ucm_sparse.ops import num_selected

EVAL_TOKENS = 64  # teacher-forced positions scored per window
GREEDY_TOKENS = 64  # decode steps of the greedy continuation
NEAR_TIE_NATS = 0.5  # a flip is a near tie when dense's top-2 log-prob is within this of its top-1
TARGETS = {"context": 8192, "sparse_ratio": 0.3, "ppl_ratio_max": 1.02, "top1_min": 0.95}


@dataclass(frozen=True)
class Source:
    """Characters ``start:stop`` of the installed file ``file`` (a path suffix) of distribution ``dist``."""

    dist: str
    file: str
    start: int
    stop: int


@dataclass(frozen=True)
class Text:
    """A named text: its sources joined by a blank line, and the sha256 of its token ids (see :func:`ids_sha256`)."""

    name: str
    sources: tuple[Source, ...]
    sha256: str


# Recorded with SmolLM2-135M-Instruct's tokenizer, numba 0.65.0 / llvmlite 0.47.0, regex 2026.11.19, torch 2.13.0,
# numpy 2.3.5 (each text 9.4K-12.5K tokens; only the first max(contexts) + EVAL_TOKENS + 1 are used).
TEXTS = (
    Text("licenses", (Source("numba", "LICENSES.third-party", 0, 26321),
                      Source("llvmlite", "LICENSE.thirdparty", 0, 12561)),
         "e7f287d7df68045389c18b2a28de5123699358a6e7ebab76635ab901d2403fbc"),
    Text("regex_readme", (Source("regex", "METADATA", 1024, 40514),),
         "b38e9493515793e1c93aed918e45a35138ba7bb5b464f782ce41d8e2d33ab987"),
    Text("torch_docstrings", (Source("torch", "torch/_torch_docs.py", 0, 30000),),
         "5fef8900b7daaeb63e072f3efc68573c55231f0d1a350ac725157154c6ad0643"),
    Text("numpy_docstrings", (Source("numpy", "numpy/_core/_add_newdocs.py", 0, 36000),),
         "e0a70ef1e8e7834f0e19dae8928104fcaf63f33c3ebaa9c6464dba5dce345f08"),
)


class TextError(RuntimeError):
    """A text's file is missing, or its token ids are not the recorded ones."""


def read_source(source: Source) -> str:
    """The characters of ``source``; raises TextError naming the distribution and file when it is not installed."""
    try:
        files = importlib.metadata.distribution(source.dist).files or ()
    except importlib.metadata.PackageNotFoundError as e:
        raise TextError(f"{source.dist} is not installed: it carries the text file {source.file}") from e
    found = [f for f in files if str(f).endswith(source.file)]
    if not found:
        raise TextError(f"{source.dist} has no installed file ending in {source.file}")
    text = found[0].read_text(encoding="utf-8")
    if len(text) < source.stop:
        raise TextError(f"{source.dist}'s {source.file} has {len(text)} characters, expected at least {source.stop}")
    return text[source.start:source.stop]


def ids_sha256(ids: list[int]) -> str:
    """Hex sha256 of token ids written as decimal numbers joined by commas."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def load_text(text: Text, tokenizer, min_tokens: int) -> torch.Tensor:
    """``[tokens]`` int64 ids of ``text``, checked against its recorded hash and ``min_tokens``."""
    ids = tokenizer("\n\n".join(read_source(s) for s in text.sources)).input_ids
    digest = ids_sha256(ids)
    if digest != text.sha256:
        names = ", ".join(f"{s.dist} {importlib.metadata.version(s.dist)}" for s in text.sources)
        raise TextError(f"text {text.name!r}: token ids hash {digest}, recorded {text.sha256} ({names}, or another "
                        "tokenizer): its figures would not compare with recorded runs; install the versions named "
                        "in TEXTS' comment, or record the new hash with new results")
    if len(ids) < min_tokens:
        raise TextError(f"text {text.name!r}: {len(ids)} tokens, the contexts asked for need {min_tokens}")
    return torch.tensor(ids)


@dataclass(frozen=True)
class Setting:
    """One GSA configuration of the sweep: a rule of ``RULES``, a block size, and a ratio or a token budget."""

    rule: str
    block_size: int
    sparse_ratio: float = 0.3
    token_budget: int | None = None
    extra: tuple = ()  # other GSAConfig keys as (key, value) pairs, e.g. (("dense_first_layers", 0),)
    select_every: int = 1  # GSAConfig.select_every
    candidates: float = 0.0  # rule "rerank": Quest's selection at this many times the ratio, re-ranked exactly

    def config(self) -> GSAConfig:
        """The GSAConfig of this setting (windows and min_blocks at their defaults unless in ``extra``)."""
        return GSAConfig(sparse_ratio=self.sparse_ratio, token_budget=self.token_budget,
                         select_every=self.select_every, **LIBRARY_RULES.get(self.rule, {}), **dict(self.extra))


ORACLE = "ucm_gsa_oracle"  # the rule (and attention function) that selects by the dense attention itself
RERANK = "ucm_gsa_rerank"  # the rule (and attention function) that re-ranks Quest's candidates by exact attention
SCORED = "ucm_gsa_scored"  # the attention function that ranks blocks by one of SCORE_RULES
# Block scores from a block's key box (kmin, kmax per channel; centre c, half-width r), per query head g of a KV
# head's group, with the softmax scale s. "quest" is GSA's rule (the bound s q.c + s |q|.r summed over the group);
# "gauss" estimates the block's log attention mass as if its keys spread uniformly over the box (log of E[exp(s q.k)]
# under a Gaussian of that spread: s q.c + s^2 sum_d q_d^2 r_d^2 / 6). "_sum" adds the group's per-head scores (one
# pass over the reprs, as the kernel does today); "_softmax" turns each head's scores into shares of its estimated
# mass (a softmax over the request's blocks, windows included) and adds those (a second pass: every block's score
# is needed before any is ranked).
SCORE_RULES = ("quest_sum", "quest_softmax", "gauss_sum", "gauss_softmax")
# Rule suffix (oracle and SCORE_RULES): every KV head of a layer attends the same blocks, those best by the heads'
# scores summed (same count). One list per request lets a kernel read a block's whole token rows (all KV heads,
# contiguous in vLLM's NHD layout) instead of one head's strided share of it.
SHARED = "_shared"
LIBRARY_RULES = {**RULES, "gauss": dict(score="gauss")}  # rule name -> GSAConfig keys (GSA's own selection)


def apply(model, setting: Setting) -> None:
    """Switch ``model``'s decode attention to GSA with ``setting`` (torch backend; any selection kept from an
    earlier decode dropped), to the oracle selection, to Quest's candidates re-ranked, or to one of
    :data:`SCORE_RULES`."""
    rule = setting.rule.removesuffix(SHARED)
    if rule != setting.rule and rule not in ("oracle", *SCORE_RULES):
        raise ValueError(f"rule: {setting.rule!r}; {SHARED!r} applies to 'oracle' and {SCORE_RULES} only")
    ucm_hf.enable(model, setting.config(), block_size=setting.block_size, backend="torch")
    for module in model.modules():
        module.ucm_shared_list = rule != setting.rule
    if rule == "oracle":
        model.set_attn_implementation(ORACLE)
    elif rule == "rerank":
        for module in model.modules():
            module.ucm_candidates = setting.candidates
        model.set_attn_implementation(RERANK)
    elif rule in SCORE_RULES:
        for module in model.modules():
            module.ucm_score_rule = rule
        model.set_attn_implementation(SCORED)


def selection_counts(model) -> tuple[int, int]:
    """(sparse decode layer steps that selected afresh, that reused a selection) since the last :func:`apply`,
    summed over the model's attention modules (``ucm_sparse.hf`` counts them with ``select_every > 1``)."""
    counts = [getattr(module, "ucm_gsa_counts", None) for module in model.modules()]
    return (sum(c.selected for c in counts if c is not None), sum(c.reused for c in counts if c is not None))


def masked_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """One batch-1 decode step's attention over the kept tokens: query ``[1, num_q_heads, 1, head_dim]``, key and
    value ``[1, num_kv_heads, seq, head_dim]``, ``keep`` bool ``[num_kv_heads, seq]``; returns ``[1, 1,
    num_q_heads, head_dim]`` in query's dtype (fp32 math)."""
    heads, seq, head_dim = key.shape[1:]
    q = query[0, :, 0].float().view(heads, -1, head_dim)
    logits = torch.einsum("hgd,hsd->hgs", q, key[0].float()) * scaling
    probs = torch.softmax(logits.masked_fill(~keep[:, None], float("-inf")), dim=-1)
    return torch.einsum("hgs,hsd->hgd", probs, value[0].float()).reshape(1, 1, -1, head_dim).to(query.dtype)


def decode_step_of(module, query: torch.Tensor) -> bool:
    """True for a batch-1 single-token step of a layer GSA covers (the others run SDPA)."""
    return query.shape[2] == 1 and module.ucm_gsa.config.sparse_layer(getattr(module, "layer_idx", None))


def oracle_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: a batch-1 decode step attends the blocks GSA's count allows (windows
    included) that hold the most dense attention mass of their KV head's query heads (of all query heads with
    ``module.ucm_shared_list``): the best any block selection of that size can do. Other calls, and layers below
    ``dense_first_layers``, run SDPA."""
    if not decode_step_of(module, query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    heads, _, head_dim = key.shape[1:]
    q = query[0, :, 0].float().view(heads, -1, head_dim)
    mass = torch.softmax(torch.einsum("hgd,hsd->hgs", q, key[0].float()) * scaling, dim=-1).sum(1)
    keep = oracle_blocks(mass, module.ucm_gsa, module.ucm_shared_list)
    return masked_decode(query, key, value, keep, scaling), None


def rerank_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function, a two-stage selection: a batch-1 decode step takes the blocks Quest
    selects at ``module.ucm_candidates`` times the sparse_ratio as candidates, reads their keys, and keeps GSA's
    count of them (windows included) by the softmax mass the KV head's query heads put on each, over the
    candidates' tokens. Other calls, and layers below ``dense_first_layers``, run SDPA."""
    if not decode_step_of(module, query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    settings = module.ucm_gsa
    wider = replace(settings.config, sparse_ratio=min(1.0, settings.config.sparse_ratio * module.ucm_candidates))
    candidates = gsa_chosen(query[0, :, 0], key[0], replace(settings, config=wider), scaling)
    heads, seq, head_dim = key.shape[1:]
    on = candidates.repeat_interleave(settings.block_size, dim=1)[:, None, :seq]
    logits = torch.einsum("hgd,hsd->hgs", query[0, :, 0].float().view(heads, -1, head_dim), key[0].float())
    mass = torch.softmax((logits * scaling).masked_fill(~on, float("-inf")), dim=-1).sum(1)
    return masked_decode(query, key, value, oracle_blocks(mass, settings), scaling), None


def box_scores(q: torch.Tensor, key: torch.Tensor, settings: ucm_hf.HFGSASettings, scale: float, rule: str
               ) -> torch.Tensor:
    """fp32 ``[num_kv_heads, blocks]`` scores of :data:`SCORE_RULES`' ``rule`` for one step's q ``[num_q_heads,
    head_dim]`` over keys ``[num_kv_heads, seq, head_dim]``, from the boxes the library keeps for the full blocks
    (``settings.config.repr_dtype``: the keys' dtype, or fp8 widened by its scale). A block still filling has no
    box yet: its score is 0 (it is a window, kept whatever it scores)."""
    heads, seq, head_dim = key.shape
    nb, full = -(-seq // settings.block_size), seq // settings.block_size
    kmin, kmax = library_boxes(key[:, :full * settings.block_size], settings)
    qg = q.float().view(heads, -1, head_dim)
    if rule == "gauss_softmax":  # the library's rule, from these boxes
        per_block = torch_gauss_shares(qg[None], kmin[None], kmax[None], torch.ones(1, full, dtype=torch.bool),
                                       scale)[0]
        return torch.nn.functional.pad(per_block, (0, nb - full))
    centre, half = (kmax + kmin) / 2, (kmax - kmin) / 2  # [heads, full, head_dim]
    linear = scale * torch.einsum("hgd,hnd->hgn", qg, centre)
    if rule.startswith("quest"):
        per_head = linear + scale * torch.einsum("hgd,hnd->hgn", qg.abs(), half)
    else:
        per_head = linear + scale ** 2 / 6 * torch.einsum("hgd,hnd->hgn", qg ** 2, half ** 2)
    per_block = per_head.sum(1) if rule.endswith("_sum") else torch.softmax(per_head, dim=-1).sum(1)
    return torch.nn.functional.pad(per_block, (0, nb - full))


def library_boxes(key: torch.Tensor, settings: ucm_hf.HFGSASettings) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(kmin, kmax)``, each ``[num_kv_heads, blocks, head_dim]``: the summaries the library's torch twin
    computes (in ``settings.config.repr_dtype``, fp8 widened by its scale) of keys ``[num_kv_heads, blocks *
    block_size, head_dim]``."""
    heads, seq, head_dim = key.shape
    blocks = ucm_hf.as_blocks(key[None], settings.block_size)
    reprs = ops.empty_reprs(blocks.shape[0], heads, head_dim, key.dtype, settings.config, key.device)
    ops.update_reprs("torch", blocks, torch.arange(blocks.shape[0]), reprs)
    kmin, kmax, _, *kscale = reprs
    widen = kscale[0][..., None] if kscale else 1.0
    return (kmin.float() * widen).transpose(0, 1), (kmax.float() * widen).transpose(0, 1)


def scored_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: a batch-1 decode step attends the windows and the blocks that score best
    by ``module.ucm_score_rule`` (one of :data:`SCORE_RULES`; summed over the KV heads with
    ``module.ucm_shared_list``), GSA's count in all. Other calls, and layers below
    ``dense_first_layers``, run SDPA."""
    if not decode_step_of(module, query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    settings = module.ucm_gsa
    per_block = box_scores(query[0, :, 0], key[0], settings, scaling, module.ucm_score_rule)
    keep = top_blocks(per_block, settings, key.shape[2], module.ucm_shared_list)
    return masked_decode(query, key, value, keep, scaling), None


def oracle_blocks(mass: torch.Tensor, settings: ucm_hf.HFGSASettings, shared: bool = False) -> torch.Tensor:
    """bool ``[heads, seq]``: the tokens of the blocks kept per KV head from its attention ``mass`` ``[heads,
    seq]``: both windows, then the blocks of most mass, GSA's count in all (``shared``: see :func:`top_blocks`)."""
    heads, seq = mass.shape
    nb = -(-seq // settings.block_size)
    per_block = torch.nn.functional.pad(mass, (0, nb * settings.block_size - seq)).view(heads, nb, -1).sum(-1)
    return top_blocks(per_block, settings, seq, shared)


def top_blocks(per_block: torch.Tensor, settings: ucm_hf.HFGSASettings, seq: int, shared: bool = False
               ) -> torch.Tensor:
    """bool ``[heads, seq]``: the tokens of the blocks kept per KV head by their scores ``per_block`` ``[heads,
    blocks]``: both windows, then the best-scoring blocks, GSA's count in all. ``shared``: every head keeps the
    blocks best by the heads' scores summed."""
    heads, nb = per_block.shape
    if shared:
        per_block = per_block.sum(0, keepdim=True).expand(heads, nb)
    bs, config = settings.block_size, settings.config
    count = num_selected(nb, config, bs)
    windows = torch.zeros(nb, dtype=torch.bool)
    windows[:config.init_window_sz] = True
    windows[nb - max(config.local_window_sz, 1):] = True
    ranked = torch.where(windows, float("inf"), per_block).argsort(dim=1, descending=True)[:, :count]
    chosen = torch.zeros(heads, nb, dtype=torch.bool).scatter_(1, ranked, True)
    return chosen.repeat_interleave(bs, dim=1)[:, :seq]


@dataclass
class Prefill:
    """A text's dense prefill: per layer K and V ``[1, kv_heads, tokens, head_dim]`` and, per context C, the
    next-token logits ``[vocab]`` after its first C tokens."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    last_logits: dict[int, torch.Tensor]
    seconds: float


def prefill(model, ids: torch.Tensor, contexts: list[int]) -> Prefill:
    """Dense SDPA prefill of ``ids[:max(contexts)]`` (``ids`` int64 ``[tokens]``)."""
    model.set_attn_implementation("sdpa")
    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    out = model(ids[None, :max(contexts)], past_key_values=cache, use_cache=True,
                logits_to_keep=torch.tensor([c - 1 for c in contexts]))
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return Prefill(kv, dict(zip(contexts, out.logits[0])), time.perf_counter() - start)


def cache_at(pre: Prefill, context: int, model):
    """A fresh DynamicCache holding copies of the prefill's first ``context`` positions."""
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(pre.kv):
        cache.update(k[:, :, :context].clone(), v[:, :, :context].clone(), layer)
    return cache


def step(model, cache, token: int) -> torch.Tensor:
    """One decode step fed ``token``: fp32 next-token logits ``[vocab]``."""
    return model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1].float()


def teacher_forced(model, cache, tokens: list[int]) -> torch.Tensor:
    """fp32 log-probs ``[len(tokens), vocab]`` of the token after each of ``tokens``, fed one per decode step."""
    return torch.stack([torch.log_softmax(step(model, cache, t), dim=-1) for t in tokens])


def greedy(model, cache, first: int, steps: int, reference: list[int] | None = None) -> list[int]:
    """Greedy tokens of ``steps`` decode steps after ``first``; stops after the first one differing from
    ``reference``."""
    tokens, token = [], first
    for i in range(steps):
        token = int(step(model, cache, token).argmax())
        tokens.append(token)
        if reference is not None and token != reference[i]:
            break
    return tokens


def leading_equal(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(dense_lp: torch.Tensor, gsa_lp: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-position figures of GSA against dense, from log-probs ``[positions, vocab]`` and the text's next tokens
    ``[positions]``: NLLs, KL(dense || GSA), argmax agreement and dense's top-1 minus top-2 log-prob."""
    dense_lp, gsa_lp = dense_lp.double(), gsa_lp.double()
    top2 = dense_lp.topk(2, dim=-1).values
    index = targets[:, None]
    return {"nll_dense": -dense_lp.gather(1, index)[:, 0], "nll_gsa": -gsa_lp.gather(1, index)[:, 0],
            "kl": (dense_lp.exp() * (dense_lp - gsa_lp)).sum(-1), "agree": dense_lp.argmax(-1) == gsa_lp.argmax(-1),
            "margin": top2[:, 0] - top2[:, 1]}


@dataclass
class Tally:
    """What one (context, setting) collected over the windows."""

    positions: list[dict] = field(default_factory=list)  # compare() results, one per window
    leading: list[int] = field(default_factory=list)  # identical leading greedy tokens, one per window
    attended: list[float] = field(default_factory=list)  # share of a sparse layer's blocks attended (first step)
    kv_attended: list[float] = field(default_factory=list)  # share of the KV of all layers attended (first step)
    selections: list[tuple[int, int]] = field(default_factory=list)  # (layer steps that selected, that reused) a window
    seconds: float = 0.0


@dataclass
class Window:
    """A text ready to measure: its JSON record, token ids ``[tokens]`` int64 and dense prefill."""

    record: dict
    ids: torch.Tensor
    pre: Prefill


def run_window(model, window: Window, context: int, sweep: "Sweep", tallies: dict) -> None:
    """Dense, then every setting of ``sweep`` at ``context``, on one window (the text's first ``context`` tokens,
    then its evaluation tokens); adds to ``tallies[(context, setting)]`` and the cache-copy times to
    ``tallies["copy_seconds"]``."""
    ids, pre = window.ids, window.pre
    feed = ids[context:context + sweep.eval_tokens].tolist()
    targets = ids[context + 1:context + sweep.eval_tokens + 1]
    first = int(pre.last_logits[context].argmax())
    model.set_attn_implementation("sdpa")
    dense_lp = teacher_forced(model, cache_at(pre, context, model), feed)
    dense_greedy = greedy(model, cache_at(pre, context, model), first, sweep.greedy_tokens)
    for setting in sweep.settings[context]:
        apply(model, setting)
        start = time.perf_counter()
        cache = cache_at(pre, context, model)
        tallies["copy_seconds"].append(time.perf_counter() - start)
        tally = tallies.setdefault((context, setting), Tally())
        tally.positions.append(compare(dense_lp, teacher_forced(model, cache, feed), targets))
        tally.selections.append(selection_counts(model))
        apply(model, setting)  # the greedy run starts from the prefill: no selection kept from the last one
        gsa_greedy = greedy(model, cache_at(pre, context, model), first, sweep.greedy_tokens, dense_greedy)
        tally.leading.append(leading_equal(gsa_greedy, dense_greedy))
        blocks = -(-(context + 1) // setting.block_size)
        share = num_selected(blocks, setting.config(), setting.block_size) / blocks
        layers, dense = model.config.num_hidden_layers, setting.config().dense_first_layers
        tally.attended.append(share)
        tally.kv_attended.append((min(dense, layers) + max(layers - dense, 0) * share) / layers)
        tally.seconds += time.perf_counter() - start
        print(f"  {window.record['name']} ctx {context} {setting}: {time.perf_counter() - start:.1f} s", flush=True)
    model.set_attn_implementation("sdpa")


@dataclass(frozen=True)
class Sweep:
    """What one run measures: the texts, the contexts, the tokens per window and the settings per context."""

    texts: tuple[Text, ...]
    contexts: tuple[int, ...]
    eval_tokens: int
    greedy_tokens: int
    settings: dict[int, list[Setting]]
    grid_note: str  # what the grid covers and why (recorded in the JSON)
    name: str = "sparse_quality_model"  # the results file's bench name


FULL_GRID = ("trimmed to ~40 minutes on 2 CPU cores (a GSA decode step at 8K costs ~0.3 s there; every rule x ratio "
             "x block size x budget at every context would take ~3 hours): at the largest context quest at 0.1 / "
             "0.2 / 0.3 / 0.5 / 0.7, mean at 0.3 / 0.5, quest with fp8 summaries at 0.3, block 16 at 0.3, the first "
             "two layers dense at 0.3, token budgets 1024 / 2048 (quest); at the other contexts quest at 0.3 / 0.5")


def full_sweep(contexts: list[int]) -> Sweep:
    """The default run: :data:`TEXTS` at ``contexts``, the settings of :data:`FULL_GRID`."""
    largest = max(contexts)
    settings = {c: [Setting("quest", 32, r) for r in (0.3, 0.5)] for c in contexts if c != largest}
    settings[largest] = ([Setting("quest", 32, r) for r in (0.1, 0.2, 0.3, 0.5, 0.7)]
                         + [Setting("mean", 32, r) for r in (0.3, 0.5)] + [Setting("quest_fp8", 32, 0.3)]
                         + [Setting("quest", 16, 0.3), Setting("quest", 32, 0.3, extra=dense_first(2))]
                         + [Setting("quest", 32, token_budget=b) for b in (1024, 2048)])
    return Sweep(TEXTS, tuple(contexts), EVAL_TOKENS, GREEDY_TOKENS, settings, FULL_GRID)


def oracle_sweep(contexts: list[int]) -> Sweep:
    """The oracle selection (:func:`oracle_attention`) at ratio 0.3 at the largest context, every layer sparse
    and the first two dense: how close any block selection of GSA's size gets to dense."""
    largest = max(contexts)
    settings = [Setting("oracle", 32, 0.3, extra=dense_first(n)) for n in (0, 2)]
    return Sweep(TEXTS, (largest,), EVAL_TOKENS, GREEDY_TOKENS, {largest: settings},
                 "oracle selection at ratio 0.3, largest context", "sparse_quality_model_oracle")


def reuse_sweep(contexts: list[int]) -> Sweep:
    """Quest 0.3's selection made every 2, 4 and 8 decode steps, fp8 summaries' every 4 and 8, and a 2048-token
    budget's every 4 and 8 (fp8: every 8), at the largest context (every step: the full sweep's rows)."""
    largest = max(contexts)
    settings = [Setting("quest", 32, 0.3, select_every=n) for n in (2, 4, 8)]
    settings += [Setting("quest_fp8", 32, 0.3, select_every=n) for n in (4, 8)]
    settings += [Setting("quest", 32, token_budget=2048, select_every=n) for n in (4, 8)]
    settings += [Setting("quest_fp8", 32, token_budget=2048, select_every=8)]
    return Sweep(TEXTS, (largest,), EVAL_TOKENS, GREEDY_TOKENS, {largest: settings},
                 "selection reuse: quest 0.3 every 2 / 4 / 8 steps, fp8 every 4 / 8, 2048-token budget every 4 / 8 "
                 "(fp8 every 8), largest context", "sparse_quality_model_reuse")


def drift_sweep(contexts: list[int]) -> Sweep:
    """Quest 0.3's selection reused with the drift rule (``select_drift``) at the largest context: every 8 steps
    without it (the reuse sweep's row, as the baseline of this run), and with drift thresholds 0.25 / 0.35; every
    16 steps without and with 0.3; every 32 (a block's worth, block 32) with 0.3. Each row says the share of layer
    steps that selected afresh."""
    largest = max(contexts)
    drift = lambda value: (("select_drift", value),)  # noqa: E731
    settings = [Setting("quest", 32, 0.3, select_every=8)]
    settings += [Setting("quest", 32, 0.3, select_every=8, extra=drift(d)) for d in (0.25, 0.35)]
    settings += [Setting("quest", 32, 0.3, select_every=16), Setting("quest", 32, 0.3, select_every=16,
                                                                     extra=drift(0.3))]
    settings += [Setting("quest", 32, 0.3, select_every=32, extra=drift(0.3))]
    return Sweep(TEXTS, (largest,), EVAL_TOKENS, GREEDY_TOKENS, {largest: settings},
                 "selection reuse with the drift rule: quest 0.3 every 8 (none, 0.25, 0.35), every 16 (none, 0.3), "
                 "every 32 (0.3), largest context", "sparse_quality_model_drift")


def rerank_sweep(contexts: list[int]) -> Sweep:
    """Two-stage selection (:func:`rerank_attention`) at the largest context: Quest 0.3's count chosen among Quest's
    selection at 1.5, 2 and 3 times the ratio, and 0.2's among twice its ratio."""
    largest = max(contexts)
    settings = [Setting("rerank", 32, 0.3, candidates=c) for c in (1.5, 2.0, 3.0)]
    settings.append(Setting("rerank", 32, 0.2, candidates=2.0))
    return Sweep(TEXTS, (largest,), EVAL_TOKENS, GREEDY_TOKENS, {largest: settings},
                 "Quest candidates re-ranked by exact attention: 0.3 x 1.5 / 2 / 3 and 0.2 x 2, largest context",
                 "sparse_quality_model_rerank")


def shared_lists_sweep(contexts: list[int]) -> Sweep:
    """One block list per request, shared by its KV heads (:data:`SHARED`), against per-head lists of the same
    count at ratio 0.3 and the largest context: the oracle's, Quest's (``quest_sum``) and gauss's (``gauss_softmax``,
    GSA's ``score="gauss"``) ranking. What sharing costs in quality, for the reads it would make contiguous."""
    largest = max(contexts)
    settings = [Setting(rule + suffix, 32, 0.3) for rule in ("oracle", "quest_sum", "gauss_softmax")
                for suffix in ("", SHARED)]
    return Sweep(TEXTS, (largest,), EVAL_TOKENS, GREEDY_TOKENS, {largest: settings},
                 "one block list per request shared by its KV heads against per-head lists, oracle / Quest / gauss "
                 "ranking at 0.3, largest context", "sparse_quality_model_shared_lists")


def score_rules_sweep(contexts: list[int]) -> Sweep:
    """:data:`SCORE_RULES` at ratios 0.2 and 0.3 at the largest context (``quest_sum`` is GSA's Quest rule computed
    here from the keys: it checks this path against the library's rows), then GSA's own ``score="gauss"`` (the
    library's kernels of ``gauss_softmax``) at both ratios and as the first of two stages (C = 2) at 0.3."""
    largest = max(contexts)
    settings = [Setting(rule, 32, r) for r in (0.3, 0.2) for rule in SCORE_RULES]
    settings += [Setting("gauss", 32, r) for r in (0.3, 0.2)]
    settings.append(Setting("gauss", 32, 0.3, extra=(("rerank_candidates", 2.0),)))
    return Sweep(TEXTS, (largest,), EVAL_TOKENS, GREEDY_TOKENS, {largest: settings},
                 "block scores from the key boxes Quest reads (SCORE_RULES) at 0.3 and 0.2, GSA's gauss rule at both "
                 "and as two stages' first (C = 2) at 0.3, largest context",
                 "sparse_quality_model_score_rules")


def quick_sweep() -> Sweep:
    """One 512-token window, 16 positions, 8 greedy steps: sparse_ratio 0.1 and the dense control 1.0."""
    return Sweep(TEXTS[:1], (512,), 16, 8, {512: [Setting("quest", 32, 0.1), Setting("quest", 32, 1.0)]},
                 "quick: one window, two settings")


def summarize(context: int, setting: Setting, tally: Tally, greedy_tokens: int) -> dict:
    """One results row from a tally (positions pooled over windows)."""
    pos = {k: torch.cat([p[k] for p in tally.positions]) for k in tally.positions[0]}
    flips = ~pos["agree"]
    nll_dense, nll_gsa = pos["nll_dense"].mean().item(), pos["nll_gsa"].mean().item()
    flip_margin = pos["margin"][flips]
    return {"name": f"ctx{context}", "impl": f"gsa_{setting.rule}", "shape": f"ctx{context}_bs{setting.block_size}",
            "context": context, "rule": setting.rule, "block_size": setting.block_size,
            "sparse_ratio": None if setting.token_budget else setting.sparse_ratio,
            "token_budget": setting.token_budget, "gsa_extra": dict(setting.extra),
            "select_every": setting.select_every, "candidates": setting.candidates,
            "dense_first_layers": setting.config().dense_first_layers,
            "blocks_attended": round(statistics.mean(tally.attended), 4),
            "kv_attended": round(statistics.mean(tally.kv_attended), 4),
            "selected_share": selected_share(tally.selections),
            "ppl_dense": round(math.exp(nll_dense), 4), "ppl_gsa": round(math.exp(nll_gsa), 4),
            "ppl_ratio": round(math.exp(nll_gsa - nll_dense), 5), "kl_mean": float(f"{pos['kl'].mean().item():.4g}"),
            "kl_p95": float(f"{pos['kl'].quantile(0.95).item():.4g}"),
            "top1_agreement": round(pos["agree"].double().mean().item(), 4), "flips": int(flips.sum()),
            "flips_near_tie": int((flip_margin < NEAR_TIE_NATS).sum()),
            "flip_dense_margin_median": round(flip_margin.median().item(), 3) if flips.any() else None,
            "dense_margin_median": round(pos["margin"].median().item(), 3),
            "flip_positions": [torch.nonzero(~p["agree"])[:, 0].tolist() for p in tally.positions],
            "greedy_identical": sum(n == greedy_tokens for n in tally.leading), "greedy_leading": tally.leading,
            "positions": int(flips.numel()), "windows": len(tally.leading), "seconds": round(tally.seconds, 1)}


def prefill_texts(model, tokenizer, texts: tuple[Text, ...], contexts: tuple[int, ...], eval_tokens: int
                  ) -> list[Window]:
    """Load and prefill every text (checked against its hash) for ``contexts``."""
    windows = []
    with torch.inference_mode():
        for text in texts:
            ids = load_text(text, tokenizer, max(contexts) + eval_tokens + 1)
            pre = prefill(model, ids, list(contexts))
            print(f"{text.name}: prefill of {max(contexts)} tokens {pre.seconds:.1f} s", flush=True)
            record = {"name": text.name, "sources": [vars(s) for s in text.sources], "tokens": len(ids),
                      "ids_sha256": text.sha256, "prefill_seconds": round(pre.seconds, 1)}
            windows.append(Window(record, ids, pre))
    return windows


def measure(model, windows: list[Window], sweep: Sweep) -> tuple[list[dict], float]:
    """Every window x context x setting of ``sweep``: the rows, and the median seconds of a KV-cache copy."""
    tallies = {"copy_seconds": []}
    with torch.inference_mode():
        for window in windows:
            for context in sweep.contexts:
                run_window(model, window, context, sweep, tallies)
    copies = tallies.pop("copy_seconds")
    return [summarize(c, s, t, sweep.greedy_tokens) for (c, s), t in tallies.items()], statistics.median(copies)


PROBE = "ucm_gsa_recall_probe"


def probe_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: dense SDPA that, at each batch-1 decode step, appends to
    ``module.ucm_recall`` the share ``[num_q_heads]`` of each head's dense attention on the blocks GSA
    (``module.ucm_gsa``) would select."""
    if query.shape[2] == 1:
        module.ucm_recall.append(selected_mass(query[0, :, 0], key[0], module.ucm_gsa, scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def gsa_chosen(q: torch.Tensor, k: torch.Tensor, settings: ucm_hf.HFGSASettings, scale: float) -> torch.Tensor:
    """bool ``[num_kv_heads, blocks]``: the blocks GSA selects (torch backend) for one step's q ``[num_q_heads,
    head_dim]`` over keys ``[num_kv_heads, seq, head_dim]``."""
    heads, seq, _ = k.shape
    nb = -(-seq // settings.block_size)
    blocks = ucm_hf.as_blocks(k[None], settings.block_size)
    table = torch.arange(nb, dtype=torch.int32)[None]
    _, sel = sparse_attention(q[None], blocks, blocks, table, [seq], settings.config, scale=scale, backend="torch")
    chosen = torch.zeros(heads, nb + 1, dtype=torch.bool)
    chosen.scatter_(1, torch.where(sel.sel_idx[0] >= 0, sel.sel_idx[0], nb).long(), True)
    return chosen[:, :nb]


def selected_mass(q: torch.Tensor, k: torch.Tensor, settings: ucm_hf.HFGSASettings, scale: float) -> torch.Tensor:
    """fp32 ``[num_q_heads]``: per query head, the dense softmax mass on the tokens of the blocks GSA selects,
    from one step's q ``[num_q_heads, head_dim]`` and keys ``[num_kv_heads, seq, head_dim]``."""
    heads, seq, head_dim = k.shape
    on = gsa_chosen(q, k, settings, scale).repeat_interleave(settings.block_size, dim=1)[:, None, :seq]
    logits = torch.einsum("hgd,hsd->hgs", q.float().view(heads, -1, head_dim), k.float()) * scale
    return (torch.softmax(logits, dim=-1) * on).sum(-1).flatten()


AttentionInterface.register(PROBE, probe_attention)
AttentionMaskInterface.register(PROBE, sdpa_mask)
AttentionInterface.register(ORACLE, oracle_attention)
AttentionMaskInterface.register(ORACLE, sdpa_mask)
AttentionInterface.register(RERANK, rerank_attention)
AttentionMaskInterface.register(RERANK, sdpa_mask)
AttentionInterface.register(SCORED, scored_attention)
AttentionMaskInterface.register(SCORED, sdpa_mask)


def probe_recall(model, window: Window, context: int, setting: Setting, steps: int) -> torch.Tensor:
    """fp32 ``[layers, steps, num_q_heads]``: the dense attention mass on ``setting``'s selection along a dense
    teacher-forced decode of ``steps`` evaluation tokens after ``context``."""
    apply(model, setting)
    attention = [layer.self_attn for layer in model.model.layers]
    for module in attention:
        module.ucm_recall = []
    model.set_attn_implementation(PROBE)
    with torch.inference_mode():
        teacher_forced(model, cache_at(window.pre, context, model), window.ids[context:context + steps].tolist())
    model.set_attn_implementation("sdpa")
    return torch.stack([torch.stack(module.ucm_recall) for module in attention])


def dense_first(layers: int, *extra: tuple) -> tuple:
    """A Setting's ``extra`` with ``dense_first_layers`` set to ``layers``."""
    return (("dense_first_layers", layers), *extra)


def investigation(model, windows: list[Window], context: int) -> tuple[Sweep, dict]:
    """Why sparse_ratio 0.3 (quest, block 32, every layer sparse) loses quality at ``context``: the per-layer and
    per-head attention mass its selection keeps along dense decodes, and the remedies tried through GSAConfig:
    the first 1-3 layers dense, wider windows, block 16, and a higher ratio of the same KV share as two dense
    layers."""
    base = Setting("quest", 32, 0.3, extra=dense_first(0))
    recall = torch.stack([probe_recall(model, w, context, base, EVAL_TOKENS) for w in windows], dim=1)
    by_layer = recall.mean(dim=(1, 2, 3))
    layers = model.config.num_hidden_layers
    same_share = round(0.3 + 2 * 0.7 / layers, 3)  # every layer sparse, reading as much KV as 2 dense layers + 0.3
    settings = [base] + [Setting("quest", 32, 0.3, extra=dense_first(n)) for n in (1, 2, 3)] + [
        Setting("quest", 32, 0.3, extra=dense_first(0, ("local_window_sz", 16))),
        Setting("quest", 16, 0.3, extra=dense_first(0, ("local_window_sz", 8))),
        Setting("quest", 32, same_share, extra=dense_first(0))]
    record = {"recall_setting": {**vars(base), "extra": dict(base.extra)},
              "recall_by_layer": [round(x, 4) for x in by_layer.tolist()],
              "recall_by_layer_head": [[round(x, 4) for x in row] for row in recall.mean(dim=(1, 2)).tolist()],
              "recall_p05_by_layer": [round(x, 4) for x in recall.flatten(1).quantile(0.05, dim=1).tolist()],
              "least_recall_layers": by_layer.argsort()[:6].tolist()}
    return Sweep(TEXTS, (context,), EVAL_TOKENS, GREEDY_TOKENS, {context: settings},
                 "investigation at one context, quest rule"), record


def check_targets(rows: list[dict]) -> dict:
    """Per rule and block size at TARGETS' context and ratio: ppl ratio and top-1 agreement within the targets."""
    return {f"{r['rule']}/bs{r['block_size']}": r["ppl_ratio"] <= TARGETS["ppl_ratio_max"]
            and r["top1_agreement"] >= TARGETS["top1_min"]
            for r in rows if r["context"] == TARGETS["context"] and r["sparse_ratio"] == TARGETS["sparse_ratio"]
            and not r["gsa_extra"] and r["select_every"] == 1}


def plot(doc: dict, path: Path) -> Path:
    """ppl ratio, top-1 agreement and KL against the share of the KV attended, at the largest context (rows of
    GSAConfig's defaults but the rule, block size, ratio or budget)."""
    plt = _pyplot()
    context = max(r["context"] for r in doc["rows"])
    rows = [r for r in doc["rows"] if r["context"] == context and not r["gsa_extra"] and r["select_every"] == 1]
    panels = (("ppl_ratio", "perplexity ratio (GSA / dense)", "linear", TARGETS["ppl_ratio_max"]),
              ("top1_agreement", "top-1 agreement with dense", "linear", TARGETS["top1_min"]),
              ("kl_mean", "mean KL(dense || GSA), nats", "log", None))
    colors = {"quest": "tab:blue", "quest_fp8": "tab:purple", "mean": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (metric, label, yscale, target) in zip(axes, panels):
        for rule, bs in sorted({(r["rule"], r["block_size"]) for r in rows}):
            mine = [r for r in rows if (r["rule"], r["block_size"]) == (rule, bs)]
            line = sorted((r["kv_attended"], r[metric]) for r in mine if r["sparse_ratio"] is not None)
            budget = sorted((r["kv_attended"], r[metric]) for r in mine if r["token_budget"])
            ax.plot(*zip(*line), LINE_STYLES[f"gsa_{rule}"] if bs == 32 else "-.", marker="o" if bs == 32 else "s",
                    color=colors[rule], label=f"{rule}, block {bs}")
            if budget:
                ax.plot(*zip(*budget), "*", ms=12, color=colors[rule], label=f"{rule}, block {bs}, token budget")
        if target is not None:
            ax.axhline(target, color="tab:red", lw=0.8, ls="-.", label=f"target {target}")
        ax.set(xlabel="share of the KV attended per step (all layers)", ylabel=label, yscale=yscale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_title(doc, f"GSA vs dense on SmolLM2-135M (fp32, torch backend), {context}-token real-text "
                             f"contexts: {rows[0]['windows']} windows x {doc['setup']['eval_tokens']} positions"))
    return _save(fig, path)


def selected_share(selections: list[tuple[int, int]]) -> float | None:
    """The share of sparse decode layer steps (teacher-forced positions, all windows) that selected afresh; None
    where nothing was counted (select_every 1: every step selects)."""
    selected, reused = sum(s for s, _ in selections), sum(r for _, r in selections)
    return round(selected / (selected + reused), 4) if selected + reused else None


def print_table(rows: list[dict]) -> None:
    print(f"{'ctx':>5} {'rule':<10}{'bs':>3} {'ratio/budget':<14}{'attended':>9}{'ppl x':>9}{'KL':>10}{'top-1':>7}"
          f"{'flips(tie)':>11}{'greedy=':>8}  leading")
    for r in rows:
        amount = (f"b{r['token_budget']}" if r["token_budget"] else f"{r['sparse_ratio']}") + "".join(
            f" {k.removeprefix('select_').split('_')[0]}{v}" for k, v in r["gsa_extra"].items())
        amount += f" every{r['select_every']}" if r.get("select_every", 1) > 1 else ""
        print(f"{r['context']:>5} {r['rule']:<10}{r['block_size']:>3} {amount:<14}{r['kv_attended']:>9.3f}"
              f"{r['ppl_ratio']:>9.4f}{r['kl_mean']:>10.2e}{r['top1_agreement']:>7.3f}{r['flips']:>6}"
              f"({r['flips_near_tie']:>2}){r['greedy_identical']:>5}/{r['windows']}  {r['greedy_leading']}")


def load_model(model_dir: Path | None = None):
    """SmolLM2-135M-Instruct (fp32, SDPA, eval mode) and its tokenizer."""
    path = fetch_model("smollm2", model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, transformers.AutoTokenizer.from_pretrained(path)


def run(sweep: Sweep, model_dir: Path | None = None, investigate: bool = False) -> Path:
    """Measure ``sweep`` (with ``investigate``: prefill its texts at its largest context, then measure
    :func:`investigation`'s sweep), write the JSON (and the PNG), print the table; returns the JSON's path."""
    start = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    contexts = (max(sweep.contexts),) if investigate else sweep.contexts
    windows = prefill_texts(model, tokenizer, sweep.texts, contexts, sweep.eval_tokens)
    found = {}
    if investigate:
        sweep, found = investigation(model, windows, contexts[0])
    rows, copy_seconds = measure(model, windows, sweep)
    verdicts = check_targets(rows)
    bench = "sparse_quality_model_investigation" if investigate else sweep.name
    path = write_results(bench, rows, ceilings={}, extra={
        "targets": TARGETS, "targets_met": verdicts, **found, "texts": [w.record for w in windows],
        "cache_copy_seconds_median": round(copy_seconds, 3), "wall_seconds": round(time.perf_counter() - start),
        "load_average_1_5_15min_at_end": [round(x, 2) for x in os.getloadavg()],
        "setup": {"model": "SmolLM2-135M-Instruct", "dtype": str(model.dtype), "repr_dtype_cache": str(model.dtype),
                  "backend": "torch", "threads": torch.get_num_threads(), "contexts": list(contexts),
                  "eval_tokens": sweep.eval_tokens, "greedy_tokens": sweep.greedy_tokens,
                  "near_tie_nats": NEAR_TIE_NATS, "gsa_defaults": {k: getattr(GSAConfig(), k) for k in (
                      "init_window_sz", "local_window_sz", "min_blocks")},
                  "kv_reuse": "each setting decodes from a copy of the dense prefill's KV cache (see "
                              "cache_copy_seconds_median against each text's prefill_seconds)",
                  "selection_reuse": "rows with select_every > 1 run GSAConfig.select_every through the "
                                     "transformers hook; the others select every step",
                  "grid": sweep.grid_note}})
    if bench == "sparse_quality_model":
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print_table(rows)
    if investigate:
        print("attention mass kept by quest 0.3, per layer:", found["recall_by_layer"])
    print(f"targets at {TARGETS}: {verdicts}")
    print(f"wrote {path} in {round(time.perf_counter() - start)} s")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2048,4096,8192", help="comma-separated context lengths (tokens)")
    mode = parser.add_mutually_exclusive_group()  # one run kind at a time (default: the full sweep)
    mode.add_argument("--quick", action="store_true", help="one 512-token window, 2 settings, few tokens")
    mode.add_argument("--investigate", action="store_true",
                        help="at the largest context: per-layer recall of quest 0.3 and the remedies tried")
    mode.add_argument("--oracle", action="store_true",
                        help="at the largest context: the oracle selection (by dense attention mass) at ratio 0.3")
    mode.add_argument("--reuse", action="store_true",
                        help="at the largest context: quest 0.3's selection reused for 2 / 4 / 8 decode steps")
    mode.add_argument("--drift", action="store_true",
                      help="at the largest context: quest 0.3 reused every 8 / 16 / 32 steps with the drift rule")
    mode.add_argument("--rerank", action="store_true",
                        help="at the largest context: Quest's candidates re-ranked by exact attention (two stages)")
    mode.add_argument("--score-rules", action="store_true",
                        help="at the largest context: block scores from Quest's key boxes (SCORE_RULES) at 0.2 / 0.3")
    mode.add_argument("--shared-lists", action="store_true",
                      help="at the largest context: one block list per request shared by its KV heads vs per head")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's); 1 on a busy machine, where OpenMP threads waiting "
                             "for a descheduled peer made decode steps ~10x slower")
    parser.add_argument("--model-dir", type=Path, default=None, help="the model folder (default: fetch_model's)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON and PNG")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = sorted(int(c) for c in args.contexts.split(","))
    if args.out is not None:
        os.environ["OUT"] = str(args.out)
    sweep = (quick_sweep() if args.quick else oracle_sweep(contexts) if args.oracle
             else reuse_sweep(contexts) if args.reuse else drift_sweep(contexts) if args.drift
             else rerank_sweep(contexts) if args.rerank
             else score_rules_sweep(contexts) if args.score_rules
             else shared_lists_sweep(contexts) if args.shared_lists else full_sweep(contexts))
    return run(sweep, args.model_dir, args.investigate)


if __name__ == "__main__":
    main()
