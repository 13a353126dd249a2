"""The three GSA primitives on either backend: block reprs, block selection, attention over block lists.

``"triton"`` runs the ``ucm_kernels`` ops (CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``); ``"torch"``
runs their vectorised torch twins (each op's ``torch.py``),
and the second stage's choice below, with the kernels' semantics (same counts and windows, ties to the lower
logical block, masked tokens, empty lists give zeros), for CPU tensors, fp32 inputs and vLLM on CPU.
``resolve_backend("auto", q)`` picks Triton for bf16/fp16 CUDA tensors and torch otherwise.

The torch versions compute every (request, KV head) the same way whatever batch or head count it is packed in,
so attention over a per-(request, head) layout (offload mode) equals attention over the paged cache bit for bit.
"""
import math
from dataclasses import dataclass

import torch

from ucm_kernels.block_mass import block_lse2, torch_block_mass
from ucm_kernels.block_repr import FP8, empty_block_repr_for, torch_update_block_repr, update_block_repr
from ucm_kernels.block_select import (SelectPlan, plan_select, select_blocks, select_from_scores, selection_counts,
                                      selection_width, torch_select_blocks)
from ucm_kernels.sparse_decode import DecodePlan, dense_decode, plan_decode, sparse_decode, torch_sparse_decode

from .config import GSAConfig

BACKENDS = ("auto", "triton", "torch")
LN2 = math.log(2.0)
TRITON_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Selection:
    """Logical blocks each (request, KV head) attends: ``sel_idx [batch, num_kv_heads, width]`` int32, ascending,
    -1 padded; ``sel_count [batch, num_kv_heads]`` int32 (how many leading entries count)."""

    sel_idx: torch.Tensor
    sel_count: torch.Tensor

    def blocks(self, request: int, head: int) -> list[int]:
        """The logical blocks of one (request, KV head), ascending."""
        return self.sel_idx[request, head, :int(self.sel_count[request, head])].tolist()


def check_backend(backend: str) -> None:
    """Raise ValueError unless ``backend`` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}, expected one of {BACKENDS}")


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for ``backend`` (one of BACKENDS) and the query tensor it will run on."""
    check_backend(backend)
    if backend != "auto":
        return backend
    return "triton" if q.is_cuda and q.dtype in TRITON_DTYPES else "torch"


def num_selected(num_blocks: int, config: GSAConfig, block_size: int) -> int:
    """Blocks a request of ``num_blocks`` logical blocks attends (``num_blocks`` when it stays dense)."""
    return selection_width(num_blocks, **select_sizes(config, block_size))


def select_sizes(config: GSAConfig, block_size: int) -> dict:
    """The selection keyword arguments of the kernels for ``config``."""
    return dict(block_size=block_size, sparse_ratio=config.sparse_ratio, init_window=config.init_window_sz,
                local_window=config.local_window_sz, min_blocks=config.min_blocks, token_budget=config.token_budget)


def candidate_sizes(config: GSAConfig, block_size: int) -> dict:
    """The selection keyword arguments of a two-stage selection's first stage: ``rerank_candidates`` times the
    ratio (at most 1) or the token budget."""
    factor = config.rerank_candidates
    return dict(select_sizes(config, block_size), sparse_ratio=min(1.0, config.sparse_ratio * factor),
                token_budget=None if config.token_budget is None else int(config.token_budget * factor))


def empty_reprs(num_blocks: int, num_kv_heads: int, head_dim: int, cache_dtype: torch.dtype, config: GSAConfig,
                device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Uninitialised block summaries in ``config.repr_dtype``: ``(kmin, kmax, kmean)``, each ``[num_blocks,
    num_kv_heads, head_dim]`` of ``cache_dtype``, or of float8_e4m3fn followed by ``kscale [num_blocks,
    num_kv_heads]`` fp32 (see ``ucm_kernels.block_repr``)."""
    dtype = FP8 if config.repr_dtype == "fp8" else cache_dtype
    return empty_block_repr_for(num_blocks, num_kv_heads, head_dim, dtype, device)


def update_reprs(backend: str, key_cache: torch.Tensor, block_ids: torch.Tensor, reprs: tuple) -> None:
    """Compute the summaries ``reprs`` (from :func:`empty_reprs`) in place at ``block_ids`` (see
    ``ucm_kernels.block_repr``; the torch backend runs its torch twin)."""
    if block_ids.numel() == 0:
        return
    op = update_block_repr if backend == "triton" else torch_update_block_repr
    op(key_cache, block_ids, *reprs)


def select(backend: str, q: torch.Tensor, reprs: tuple, block_table: torch.Tensor, seq_lens: torch.Tensor,
           config: GSAConfig, block_size: int, *, kept: Selection | None = None,
           reselect: torch.Tensor | None = None, sel_rows: torch.Tensor | None = None,
           key_cache: torch.Tensor | None = None, scale: float | None = None, candidate_keys=None,
           plans: dict | None = None) -> Selection:
    """The blocks each (request, KV head) attends this step (see ``ucm_kernels.block_select.select_blocks``);
    ``reprs`` as from :func:`empty_reprs`. With ``reselect`` (``[batch]`` int32/bool), only its nonzero rows are
    selected: the others keep their lists in ``kept`` (required then, its lists as wide as a selection of this
    table), which is written in place and returned; with ``sel_rows`` too (``[batch]`` int64, the one-stage Triton
    selection only), request ``b``'s lists are row ``sel_rows[b]`` of ``kept`` (e.g. a store of lists by request
    slot), and ``kept`` is returned as it is. With ``config.rerank_candidates > 1`` the candidates are
    re-ranked by exact attention over their keys (:func:`rerank_select`): their keys come
    from ``key_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]`` (read through ``block_table``), or
    from ``candidate_keys(candidates) -> (keys, table)`` where the caller gathers them; ``scale`` is the softmax
    scale (default ``head_dim ** -0.5``). ``plans``: the step's dict of launch plans (see :func:`attend`); the
    one-stage Triton selection plans each shape once into it (settings checked, score scratch allocated)."""
    kmin, kmax, kmean, *kscale = reprs
    args = dict(score=config.score, kscale=kscale[0] if kscale else None, scale=scale,
                **select_sizes(config, block_size))
    if sel_rows is not None and (backend != "triton" or config.rerank_candidates > 1 or kept is None):
        raise ValueError(f"sel_rows: taken by the one-stage Triton selection with kept only (backend {backend!r}, "
                         f"rerank_candidates {config.rerank_candidates}, kept {'None' if kept is None else 'given'})")
    if config.rerank_candidates > 1:
        if candidate_keys is None:
            if key_cache is None:
                raise ValueError("key_cache: required with rerank_candidates > 1 (the second stage reads keys)")
            candidate_keys = lambda candidates: (key_cache, block_table)  # noqa: E731
        sel_idx, sel_count = rerank_select(backend, q, reprs, candidate_keys, block_table, seq_lens, config,
                                           block_size, scale)
    elif backend == "triton":
        out = None if kept is None else (kept.sel_idx, kept.sel_count)
        if plans is None:
            return Selection(*select_blocks(q, kmin, kmax, kmean, block_table, seq_lens, out=out,
                                            reselect=reselect, sel_rows=sel_rows, **args))
        plan = _select_plan(plans, q, kmin if kmin is not None else kmean, block_table, config, block_size)
        return Selection(*plan.run(q, kmin, kmax, kmean, block_table, seq_lens, kscale=args["kscale"], out=out,
                                   reselect=reselect, sel_rows=sel_rows, scale=scale))
    else:
        sel_idx, sel_count = torch_select_blocks(q, kmin, kmax, kmean, block_table, seq_lens, **args)
    if reselect is None:
        return Selection(sel_idx, sel_count)
    if kept is None:
        raise ValueError("reselect: given without kept; the rows not reselected keep their lists from kept")
    rows = reselect.bool()
    kept.sel_idx.copy_(torch.where(rows[:, None, None], sel_idx, kept.sel_idx))
    kept.sel_count.copy_(torch.where(rows[:, None], sel_count, kept.sel_count))
    return kept


def attend(backend: str, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           block_table: torch.Tensor, seq_lens: torch.Tensor, selection: Selection | None,
           scale: float | None, plans: dict | None = None, inputs_ready: bool = False) -> torch.Tensor:
    """Decode attention over the selected blocks, or over every block when ``selection`` is None. ``plans``: a
    dict the caller keeps for one decode step; the Triton backend plans each shape of call once into it (splits,
    tiles, scratch) and the step's other layers reuse that plan (the same plan a call without ``plans`` makes).
    ``inputs_ready``: the Triton kernels' promise that the lists, table and lengths were written before the kernel
    launched just ahead (``ucm_kernels.sparse_decode.sparse_decode``); the torch backend ignores it."""
    if backend == "triton":
        plan = _decode_plan(plans, q, key_cache, block_table, selection)
        if selection is None:
            return dense_decode(q, key_cache, value_cache, block_table, seq_lens, scale=scale, plan=plan,
                                inputs_ready=inputs_ready)
        return sparse_decode(q, key_cache, value_cache, block_table, seq_lens, selection.sel_idx,
                             selection.sel_count, scale=scale, plan=plan, inputs_ready=inputs_ready)
    if selection is None:
        selection = full_selection(seq_lens, key_cache.shape[2], key_cache.shape[1], block_table.shape[1])
    return torch_sparse_decode(q, key_cache, value_cache, block_table, seq_lens, selection.sel_idx,
                               selection.sel_count, scale=scale)


def _select_plan(plans: dict, q: torch.Tensor, reprs: torch.Tensor, block_table: torch.Tensor, config: GSAConfig,
                 block_size: int) -> SelectPlan:
    """The step's selection plan for this shape from ``plans`` (made and kept on first use)."""
    shape = (q.shape[0], reprs.shape[1], q.shape[2], block_table.shape[1])
    return _planned(plans, ("select", *shape, q.shape[1], q.device), lambda: plan_select(
        *shape, score=config.score, device=q.device, num_q_heads=q.shape[1], **select_sizes(config, block_size)))


def _decode_plan(plans: dict | None, q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor,
                 selection: Selection | None) -> DecodePlan | None:
    """The step's plan for a call of this shape from ``plans`` (made and kept on first use), or None without
    ``plans`` (the kernel then plans the call itself)."""
    if plans is None:
        return None
    width = block_table.shape[1] if selection is None else selection.sel_idx.shape[2]
    key = ("decode", tuple(q.shape), tuple(key_cache.shape[1:]), width, selection is None, q.device, q.dtype)
    return _planned(plans, key, lambda: plan_decode(q, key_cache, width, dense=selection is None))


def _planned(plans: dict, key: tuple, make):
    """``plans[key]``, made by ``make()`` the first time a step asks for it."""
    if key not in plans:
        plans[key] = make()
    return plans[key]


def full_selection(seq_lens: torch.Tensor, num_kv_heads: int, block_size: int, width: int) -> Selection:
    """Every logical block of each request, ``width`` columns (at least the longest request's block count)."""
    counts = (seq_lens.long() + block_size - 1) // block_size
    logical = torch.arange(width, device=seq_lens.device)
    sel_idx = torch.where(logical < counts[:, None], logical, -1).int()
    return Selection(sel_idx[:, None, :].expand(-1, num_kv_heads, -1),
                     counts.int()[:, None].expand(-1, num_kv_heads))


def rerank_select(backend: str, q: torch.Tensor, reprs: tuple, candidate_keys, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, config: GSAConfig, block_size: int, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage selection (``config.rerank_candidates`` C > 1), outputs as :func:`torch_select_blocks`': the score
    rule selects C times the blocks (C x sparse_ratio, or C x token_budget) as candidates; then per (request, KV
    head) the softmax of each of its query heads over the candidates' tokens, summed over the group and over each
    block's tokens, ranks the candidates, and the windows plus the best of the rest, the one-stage count in all,
    are kept (ascending, -1 padded). ``candidate_keys(candidates)`` gives ``(keys [n, block_size, num_kv_heads,
    head_dim], table)`` holding at least the candidates' blocks, ``table`` indexing them as ``block_table``'s
    logical blocks. Both stages run on ``backend`` ("triton": the select kernel and
    ``ucm_kernels.block_mass``; "torch": their torch twins)."""
    kmin, kmax, kmean, *kscale = reprs
    wide = candidate_sizes(config, block_size)
    first_stage = select_blocks if backend == "triton" else torch_select_blocks
    candidates = Selection(*first_stage(q, kmin, kmax, kmean, block_table, seq_lens, score=config.score,
                                        kscale=kscale[0] if kscale else None, scale=scale, **wide))
    mass_of = block_mass if backend == "triton" else _torch_mass
    mass = mass_of(q, *candidate_keys(candidates), seq_lens, candidates, scale)  # [batch, heads, width]
    return keep_most_mass(backend, candidates, mass, block_table, seq_lens, config, block_size)


def keep_most_mass(backend: str, candidates: Selection, mass: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, config: GSAConfig, block_size: int, **placement
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The second stage's choice among ``candidates``: the windows and the listed blocks of most ``mass`` (fp32
    ``[batch, num_kv_heads, width]``, ties to the lower logical block), the one-stage count per request;
    ``(sel_idx, sel_count)`` as :func:`torch_select_blocks` returns them. "triton": the masses scattered over the
    logical blocks (-inf where no candidate) and picked by the select kernel's top-k (``select_from_scores``, which
    takes ``placement``: ``out``, ``reselect``, ``sel_rows``; the torch twin takes none)."""
    sizes = select_sizes(config, block_size)
    batch, max_blocks = block_table.shape
    if backend == "triton":
        listed = ((torch.arange(mass.shape[2], device=mass.device) < candidates.sel_count[..., None])
                  & (candidates.sel_idx >= 0))
        scores = mass.new_full((batch, mass.shape[1], max_blocks + 1), float("-inf"))  # column max_blocks: a sink
        scores.scatter_(-1, torch.where(listed, candidates.sel_idx.long(), max_blocks),
                        torch.where(listed, mass, float("-inf")))
        return select_from_scores(scores[..., :max_blocks], seq_lens, **sizes, **placement)
    if placement:
        raise ValueError(f"{sorted(placement)}: the torch twin returns new lists; merge them as ops.select does")
    nb = torch.clamp((seq_lens.long() + block_size - 1) // block_size, max=max_blocks)
    count = selection_counts(nb, **sizes)
    logical = candidates.sel_idx.long()
    listed = torch.arange(logical.shape[2], device=mass.device) < candidates.sel_count[..., None]
    windows = (logical < config.init_window_sz) | (logical >= (nb - max(config.local_window_sz, 1))[:, None, None])
    rank = torch.where(listed & windows, float("inf"), torch.where(listed, mass, float("-inf")))
    order = rank.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(listed).scatter_(-1, order, torch.arange(order.shape[-1], device=mass.device)
                                             .expand_as(order) < count[:, None, None])
    width = selection_width(max_blocks, **sizes)
    chosen = torch.where(keep & listed, logical, max_blocks).sort(dim=-1).values[..., :width]
    sel_idx = torch.where(chosen < max_blocks, chosen, -1).int()
    sel_count = torch.where(nb > 0, count, 0)[:, None].expand(batch, logical.shape[1]).int().contiguous()
    return sel_idx, sel_count


def _torch_mass(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                candidates: Selection, scale: float | None = None) -> torch.Tensor:
    return torch_block_mass(q, key_cache, block_table, seq_lens, candidates.sel_idx, candidates.sel_count, scale)


def block_mass(q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               candidates: Selection, scale: float | None = None, reselect: torch.Tensor | None = None
               ) -> torch.Tensor:
    """``ucm_kernels.block_mass.torch_block_mass``'s masses from the kernel's per-(block, query head)
    log2-sum-exp (``ucm_kernels.block_mass``); with ``reselect``, rows where it is zero hold no meaningful mass."""
    lse = block_lse2(q, key_cache, block_table, seq_lens, candidates.sel_idx, candidates.sel_count, scale,
                     reselect) * LN2
    return torch.exp(lse - torch.logsumexp(lse, dim=-1, keepdim=True)).nan_to_num(0.0).sum(dim=2)


