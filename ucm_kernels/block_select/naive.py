"""Plain-torch reference of GSA block selection (fp32 scores, ``torch.topk``, a loop over requests and heads)."""
import math
from fractions import Fraction

import torch


def naive_num_selected(num_blocks: int, *, block_size: int, sparse_ratio: float, init_window: int,
                       local_window: int, min_blocks: int, token_budget: int | None = None) -> int:
    """Blocks a request of ``num_blocks`` logical blocks attends (all of them when it stays dense).

    ``sparse_ratio`` is taken as the decimal it prints as (0.1 * 10 blocks is 1 block, not 2).
    """
    if token_budget is None:
        wanted = math.ceil(Fraction(str(float(sparse_ratio))) * num_blocks)
    else:
        wanted = -(-token_budget // block_size)
    return min(num_blocks, max(wanted, min_blocks, init_window + max(local_window, 1)))


def naive_block_scores(q: torch.Tensor, kmin: torch.Tensor | None, kmax: torch.Tensor | None,
                       kmean: torch.Tensor | None, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                       block_size: int, score: str = "quest", kscale: torch.Tensor | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Score of every logical block per (request, KV head): ``[batch, num_kv_heads, max_blocks_per_seq]`` fp32.

    The group's query heads are scored separately and summed: Quest sums per-head upper bounds
    ``sum_d max(q_d * kmin_d, q_d * kmax_d)``, the mean rule per-head ``q . kmean``, the gauss rule per-head
    shares of estimated attention mass (:func:`naive_gauss_shares`, softmax ``scale``, default head_dim ** -0.5).
    fp8 reprs are first widened to fp32 and multiplied by their ``kscale`` (exact). Blocks that are not full (no
    repr yet) score -inf.
    """
    reprs = kmean if score == "mean" else kmin
    batch, num_q_heads, head_dim = q.shape
    heads = reprs.shape[1]
    qg = q.float().view(batch, heads, num_q_heads // heads, 1, head_dim)  # [b, h, g, 1, d]
    phys = block_table.long().clamp(0, reprs.shape[0] - 1)

    def gather(repr_):  # [b, h, 1, m, d]
        values = repr_[phys].float()
        if repr_.dtype == torch.float8_e4m3fn:
            values = values * kscale[phys][..., None]
        return values.permute(0, 2, 1, 3)[:, :, None]

    logical = torch.arange(block_table.shape[1], device=q.device)
    full = logical[None, :] < (seq_lens.long() // block_size)[:, None]
    if score == "mean":
        scores = (qg * gather(kmean)).sum(dim=(2, 4))
    elif score == "gauss":
        scale = head_dim ** -0.5 if scale is None else scale
        scores = torch.zeros(batch, heads, block_table.shape[1], device=q.device)
        lows, highs = gather(kmin)[:, :, 0], gather(kmax)[:, :, 0]  # [b, h, m, d]
        for b in range(batch):
            for h in range(heads):
                scores[b, h] = naive_gauss_shares(qg[b, h, :, 0], lows[b, h], highs[b, h], full[b], scale)
    else:
        scores = torch.maximum(qg * gather(kmin), qg * gather(kmax)).sum(dim=(2, 4))
    return scores.masked_fill(~full[:, None, :], float("-inf"))


def naive_gauss_shares(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, full: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """The gauss score of one (request, KV head): fp32 ``[blocks]`` from its group's queries ``q [group, head_dim]``
    and its blocks' fp32 ``kmin``, ``kmax`` ``[blocks, head_dim]`` (``full`` bool ``[blocks]``: the blocks that
    have them). Each query head's log attention mass on a block is estimated as if the block's keys spread
    uniformly over its box (centre c, half-width r: ``scale q.c + scale**2 / 6 * sum_d q_d**2 r_d**2``, the log of
    E[exp(scale q.k)] for a Gaussian of that spread); a softmax over the full blocks makes it the head's share of
    its attention, and the group's shares are added (0 where not full). A block whose log-mass is NaN (NaN reprs)
    is left out of that softmax and its share is NaN, so it ranks first as in the other rules."""
    shares = torch.zeros(kmin.shape[0], device=kmin.device)
    if not full.any():
        return shares
    centre, half = (kmax[full] + kmin[full]) / 2, (kmax[full] - kmin[full]) / 2
    for query in q.float():
        log_mass = scale * (centre @ query) + scale ** 2 / 6 * ((half ** 2) @ (query ** 2))
        known = ~log_mass.isnan()
        share = torch.full_like(log_mass, float("nan"))
        share[known] = torch.softmax(log_mass[known], dim=0)
        shares[full] += share
    return shares


def naive_select_blocks(q: torch.Tensor, kmin: torch.Tensor | None, kmax: torch.Tensor | None,
                        kmean: torch.Tensor | None, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                        block_size: int, sparse_ratio: float, init_window: int, local_window: int,
                        min_blocks: int, score: str = "quest", token_budget: int | None = None,
                        kscale: torch.Tensor | None = None, scale: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`ucm_kernels.block_select.select_blocks` (same arguments, outputs and width)."""
    sizes = dict(block_size=block_size, sparse_ratio=sparse_ratio, init_window=init_window,
                 local_window=local_window, min_blocks=min_blocks, token_budget=token_budget)
    scores = naive_block_scores(q, kmin, kmax, kmean, block_table, seq_lens, block_size=block_size, score=score,
                                kscale=kscale, scale=scale)
    batch, heads, max_blocks = scores.shape
    local = max(local_window, 1)
    sel_idx = torch.full((batch, heads, naive_num_selected(max_blocks, **sizes)), -1, dtype=torch.int32)
    sel_count = torch.zeros(batch, heads, dtype=torch.int32)
    for b in range(batch):
        nb = min(-(-int(seq_lens[b]) // block_size), max_blocks)
        count = naive_num_selected(nb, **sizes)
        for h in range(heads):
            chosen = set(range(nb))
            if count < nb:
                middle = scores[b, h, init_window:nb - local]
                top = torch.topk(middle, count - init_window - local).indices + init_window
                chosen = set(range(init_window)) | set(range(nb - local, nb)) | set(top.tolist())
            sel_idx[b, h, :count] = torch.tensor(sorted(chosen), dtype=torch.int32)
            sel_count[b, h] = count
    return sel_idx.to(q.device), sel_count.to(q.device)
