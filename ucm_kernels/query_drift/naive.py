"""Loop reference of :func:`query_drift`: one row and head at a time, in float64, straight from the contract."""
import torch

from .torch import NORM_FLOOR


def naive_query_drift(q: torch.Tensor, kept_q: torch.Tensor, slots: torch.Tensor, reselect: torch.Tensor, *,
                      threshold: float) -> list[int]:
    """``fresh`` as a list; ``kept_q`` is updated in place, rows in order (a later row naming the same slot, only
    ever the spare, overwrites an earlier one)."""
    fresh = []
    for r, slot in enumerate(slots.tolist()):
        similarity = 0.0
        for h in range(q.shape[1]):
            now, then = q[r, h].double(), kept_q[slot, h].double()
            norms = float(now.norm() * then.norm())
            similarity += float(now @ then) / norms if norms > NORM_FLOOR else 0.0
        drift = 1.0 - similarity / q.shape[1]
        fresh.append(1 if int(reselect[r]) or drift > threshold else 0)
        if fresh[-1]:
            kept_q[slot] = q[r].to(kept_q.dtype)
    return fresh
