"""Vectorised torch twin of :func:`query_drift` (any device; the CPU path)."""
import torch

NORM_FLOOR = 1e-30  # a product of norms below this counts as zero (similarity 0)


def query_drift(q: torch.Tensor, kept_q: torch.Tensor, slots: torch.Tensor, reselect: torch.Tensor, *,
                threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]`` int32 ``fresh`` of the rows (package doc), written into ``out`` when given; ``kept_q`` ``[slots + 1,
    num_q_heads, head_dim]`` is updated in place. ``q`` ``[n, num_q_heads, head_dim]``, ``slots`` ``[n]`` int64,
    ``reselect`` ``[n]`` int32 or bool."""
    now, then = q.float(), kept_q[slots].float()
    norms = now.norm(dim=-1) * then.norm(dim=-1)
    similarity = torch.where(norms > NORM_FLOOR, (now * then).sum(-1) / norms.clamp(min=NORM_FLOOR), 0.0)
    fresh = (reselect != 0) | (1.0 - similarity.mean(-1) > threshold)
    kept_q[slots] = torch.where(fresh[:, None, None], q.to(kept_q.dtype), kept_q[slots])
    fresh = fresh.to(torch.int32)
    return fresh if out is None else out.copy_(fresh)
