"""Per-request GSA state: how far each running sequence has grown, forgotten when it finishes.

A step hands in the batch's request ids and lengths; the table answers each request's length at its previous
step (0 for a new request, and for one whose length went down, i.e. was preempted and restarted), which is what
decides the blocks that became full since and need a representation.
"""
from collections.abc import Hashable, Sequence


class RequestTable:
    """Tokens of each running request as of its last step."""

    def __init__(self):
        self._seq_lens: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._seq_lens)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._seq_lens

    def advance(self, request_ids: Sequence[Hashable], seq_lens: Sequence[int]) -> list[int]:
        """Record the new lengths; return each request's previous one (0 when new or restarted)."""
        if len(set(request_ids)) != len(request_ids):
            raise ValueError(f"request_ids: {list(request_ids)!r} repeats an id; one entry per running request")
        before = []
        for request_id, seq_len in zip(request_ids, seq_lens):
            previous = self._seq_lens.get(request_id, 0)
            before.append(previous if previous <= seq_len else 0)
            self._seq_lens[request_id] = seq_len
        return before

    def finish(self, request_id: Hashable) -> None:
        """Forget a finished (or aborted) request; unknown ids are ignored."""
        self._seq_lens.pop(request_id, None)
