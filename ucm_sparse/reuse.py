"""Selection reuse (``GSAConfig.select_every``): which rows of a decode step select afresh, and where each layer's
selections are kept between steps. Device tensors only: no host read, so a plan can decide it each step and a
CUDA graph replays the selection kernels with the new mask.

A row keeps its previous selection while all of these hold:

* its slot served the same request at the previous decode step: the request grew by exactly one token, its block
  count did not change, and its last block is the same physical block (that block was partly filled at the
  previous step, so no other running request could own it);
* the selection is younger than ``select_every`` steps;
* the block table has the width it had (the stored lists are kept per width).

So a request reselects at least every ``select_every`` steps and whenever a block fills (every ``block_size``
tokens): the lists it reuses always name its current blocks, and the block of the current token is attended
because it was already its last block. A slot absent from a step forgets its request.
"""
import torch

from ucm_kernels.block_select import selection_width

from . import ops
from .config import GSAConfig


class ReuseBook:
    """Per-slot state of selection reuse for up to ``slots`` requests (a slot: a batch row in vLLM, a request in
    :class:`ucm_sparse.GSA`).

    Args:
        every: ``select_every`` (1: every row reselects at every step).
        slots: how many slots the state covers.
        block_size: tokens per KV block.
        device: where the state lives (the block table's device).
    """

    def __init__(self, every: int, slots: int, block_size: int, device: torch.device | str):
        self.every, self.slots, self.block_size = every, slots, block_size
        self._seq_len = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self._tail = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self._age = torch.zeros(slots, dtype=torch.int32, device=device)
        self._reselect = torch.ones(slots, dtype=torch.int32, device=device)  # fixed: CUDA graphs read it
        self._width = -1  # the block table width of the previous step

    def step(self, seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Record one decode step; return ``[n]`` int32, 1 where the row selects afresh.

        Args:
            seq_lens: ``[n]`` int tokens per row, the current one included (0: a padding row).
            block_table: ``[n, max_blocks]`` int logical -> physical block.
            slots: ``[n]`` int64 slot of each row, distinct; None: row i is slot i (then the result is a view of
                a buffer that stays put across steps).
        """
        n = seq_lens.shape[0]
        if n > self.slots:
            raise ValueError(f"seq_lens: {n} rows, but the reuse state holds {self.slots} slots")
        lens = seq_lens.to(torch.int32)
        blocks = (lens + self.block_size - 1) // self.block_size
        last = (blocks - 1).clamp(min=0, max=max(block_table.shape[1] - 1, 0)).long()
        tail = block_table.gather(1, last[:, None])[:, 0].to(torch.int32) if block_table.shape[1] else lens * 0
        where = slice(0, n) if slots is None else slots
        before, age = self._seq_len[where], self._age[where]
        continues = (lens == before + 1) & (blocks == (before + self.block_size - 1) // self.block_size)
        reuse = continues & (tail == self._tail[where]) & (blocks > 0) & (age + 1 < self.every)
        reuse &= block_table.shape[1] == self._width
        self._width = block_table.shape[1]
        new_age = torch.where(reuse, age + 1, 0)
        self._seq_len.fill_(-1)  # every slot not in this step forgets its request
        self._seq_len[where], self._tail[where], self._age[where] = lens, tail, new_age
        if slots is None:
            reselect = self._reselect[:n]
            torch.logical_not(reuse, out=reselect)
            return reselect
        return (~reuse).to(torch.int32)


    def forget(self, slot: int) -> None:
        """The request in ``slot`` ended: whatever takes the slot next selects afresh."""
        self._seq_len[slot] = -1


class SlotMap:
    """Request id -> slot, for callers that name their requests (:class:`ucm_sparse.GSA`); slots of finished
    requests are handed out again, and ``capacity`` doubles when the running requests outgrow it."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._slots: dict = {}
        self._free: list[int] = []
        self._unused = 0  # slots from here up were never handed out

    def assign(self, request_ids) -> list[int]:
        """The slot of each request, new requests getting free ones."""
        for request_id in request_ids:
            if request_id not in self._slots:
                self._slots[request_id] = self._free.pop() if self._free else self._new_slot()
        return [self._slots[request_id] for request_id in request_ids]

    def _new_slot(self) -> int:
        slot, self._unused = self._unused, self._unused + 1
        while self._unused > self.capacity:
            self.capacity *= 2
        return slot

    def release(self, request_id) -> int | None:
        """Free the slot of a finished request; return it (None for an unknown id)."""
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)
        return slot


class SelectionStore:
    """One layer's selections kept between steps: ``sel_idx [slots, num_kv_heads, width]`` int32 (-1 padded) and
    ``sel_count [slots, num_kv_heads]`` int32, per selection width (a new width starts empty: its rows must
    reselect, as a new :class:`ReuseBook` makes them)."""

    def __init__(self, slots: int, num_kv_heads: int, device: torch.device | str):
        self.slots, self.num_kv_heads, self.device = slots, num_kv_heads, device
        self._by_width: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def buffers(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sel_idx, sel_count)`` of every slot for lists ``width`` wide (allocated at the first call)."""
        if width not in self._by_width:
            self._by_width[width] = (
                torch.full((self.slots, self.num_kv_heads, width), -1, dtype=torch.int32, device=self.device),
                torch.zeros(self.slots, self.num_kv_heads, dtype=torch.int32, device=self.device))
        return self._by_width[width]

    def select(self, backend: str, q: torch.Tensor, reprs: tuple, block_table: torch.Tensor, seq_lens: torch.Tensor,
               config: GSAConfig, block_size: int, slots: torch.Tensor, reselect: torch.Tensor,
               table_width: int) -> ops.Selection:
        """This step's lists of a layer (``ucm_sparse.ops.select`` arguments): the rows ``reselect`` names select
        afresh, the others attend the lists stored in their ``slots``; the store is updated.

        Args:
            block_table: ``[n, max_blocks]`` the step's table, possibly cut to its longest row.
            slots: ``[n]`` int64 slot of each row; reselect: ``[n]`` from :meth:`ReuseBook.step`.
            table_width: the width of the uncut table (the stored lists are kept at that width's selection width).
        """
        sizes = ops.select_sizes(config, block_size)
        stored_idx, stored_count = self.buffers(selection_width(table_width, **sizes))
        width = selection_width(block_table.shape[1], **sizes)
        kept = ops.Selection(stored_idx[slots, :, :width], stored_count[slots])
        ops.select(backend, q, reprs, block_table, seq_lens, config, block_size, kept=kept, reselect=reselect)
        stored_idx[slots, :, :width] = kept.sel_idx
        stored_count[slots] = kept.sel_count
        return kept
