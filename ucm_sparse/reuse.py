"""Selection reuse (``GSAConfig.select_every``): which rows of a decode step select afresh, and where each layer's
selections are kept between steps. Device tensors only: no host read, so a plan can decide it each step and a
CUDA graph replays the selection kernels with the new mask.

Each running request has a slot: :class:`SlotMap` gives one per request id (:class:`RequestReuse`, which serves
:class:`ucm_sparse.GSA` and the offload mode); inside vLLM, whose batches name no request,
:meth:`ReuseBook.tail_slots` finds a row's slot by its last physical block.
That block is partly filled, so no other running request holds it, and a request keeps it for ``block_size``
steps: it identifies the request whatever row the request lands in (vLLM moves rows as requests finish; batches
may take turns). A row keeps its previous selection while all of these hold:

* its request grew by exactly one token since its slot's last step, its block count did not change, and its
  last block is the same physical block;
* the selection is younger than ``select_every`` steps;
* the block table has the width it had (the stored lists are kept per width).

So a request reselects at least every ``select_every`` steps and whenever a block fills (every ``block_size``
tokens): the lists it reuses always name its current blocks, and the block of the current token is attended
because it was already its last block.
"""
import torch

from ucm_kernels.block_select import selection_width
from ucm_kernels.reuse_step import reuse_step, torch_reuse_step
from ucm_kernels.reuse_step.torch import last_blocks

from . import ops
from .config import GSAConfig

BUCKETS_PER_SLOT = 16  # the last-block -> slot table: hashed, a collision only costs a reselection
SLOTS_PER_ROW = 4  # slots per batch row found by last block: one comes round again after that many new ones


class ReuseBook:
    """Per-slot state of selection reuse for up to ``slots`` running requests, and one spare slot (index
    ``slots``) that padding rows share and never reuse.

    Args:
        every: ``select_every`` (1: every row reselects at every step).
        slots: how many requests the state covers (by last block: a few times the most rows of a step, since a
            request takes a new slot each time it opens a block and slots are handed out in turn).
        block_size: tokens per KV block.
        device: where the state lives (the block table's device).
    """

    def __init__(self, every: int, slots: int, block_size: int, device: torch.device | str):
        self.every, self.slots, self.block_size = every, slots, block_size
        self.capacity = slots + 1  # rows of per-slot state, the spare included
        self._seq_len = torch.full((self.capacity,), -1, dtype=torch.int32, device=device)
        self._tail = torch.full((self.capacity,), -1, dtype=torch.int32, device=device)
        self._age = torch.zeros(self.capacity, dtype=torch.int32, device=device)
        self._owner = torch.full((BUCKETS_PER_SLOT * slots + 1,), -1, dtype=torch.long, device=device)
        self._cursor = torch.zeros((), dtype=torch.long, device=device)  # the next slot handed out
        self._width = -1  # the block table width of the previous step

    def step(self, seq_lens: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor,
             width: int | None = None) -> torch.Tensor:
        """Record one decode step; return ``[n]`` int32, 1 where the row selects afresh.

        Args:
            seq_lens: ``[n]`` int tokens per row, the current one included (0: a padding row).
            block_table: ``[n, max_blocks]`` int logical -> physical block.
            slots: ``[n]`` int64 slot of each row (distinct, but for the spare).
            width: the table width the stored lists are kept at (default ``max_blocks``); all rows reselect
                when it changes.
        """
        self._check_rows(seq_lens)
        width = block_table.shape[1] if width is None else width
        same_width, self._width = width == self._width, width
        step = reuse_step if block_table.is_cuda else torch_reuse_step  # one launch on a GPU
        return step(seq_lens, block_table, slots, self._seq_len, self._tail, self._age, block_size=self.block_size,
                    every=self.every, num_slots=self.slots, same_width=same_width)

    def tail_slots(self, seq_lens: torch.Tensor, block_table: torch.Tensor,
                   new_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[n]`` int64 slot of each row, found by its last block: the slot that block was recorded in, if that
        slot still holds it; else the next slot in turn (``new_rows``, bool ``[n]``, always take one: rows whose
        earlier blocks came from elsewhere). Padding rows (length 0) get the spare slot."""
        lens, _, tail = self._last_blocks(seq_lens, block_table)
        live = lens > 0
        buckets = self._owner.shape[0] - 1
        key = torch.where(live, tail.long() % buckets, buckets)
        held = self._owner[key]
        known = live & (held >= 0) & (self._tail[held.clamp(min=0)] == tail)
        if new_rows is not None:
            known &= ~new_rows
        new = live & ~known
        fresh = (self._cursor + torch.cumsum(new, 0) - 1) % self.slots
        slots = torch.where(known, held, torch.where(live, fresh, self.slots))
        self._cursor += new.sum()
        self._owner[key] = torch.where(live, slots, -1)
        return slots

    def forget_tails(self, seq_lens: torch.Tensor, block_table: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows (bool ``[n]``) computing a prompt this step: whatever slot their last block was recorded in stops
        naming it (a block freed by a finished request and taken as a new prompt's last block)."""
        lens, _, tail = self._last_blocks(seq_lens, block_table)
        buckets = self._owner.shape[0] - 1
        self._owner.index_fill_(0, torch.where(rows & (lens > 0), tail.long() % buckets, buckets), -1)

    def _last_blocks(self, seq_lens: torch.Tensor, block_table: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int32 ``(lengths, block counts, last physical blocks)`` of the rows."""
        self._check_rows(seq_lens)
        return last_blocks(seq_lens, block_table, self.block_size)

    def _check_rows(self, seq_lens: torch.Tensor) -> None:
        if seq_lens.shape[0] > self.capacity:
            raise ValueError(f"seq_lens: {seq_lens.shape[0]} rows, but the reuse state holds {self.slots} slots")

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
               table_width: int, **keys) -> ops.Selection:
        """This step's lists of a layer (``ucm_sparse.ops.select`` arguments): the rows ``reselect`` names select
        afresh, the others attend the lists stored in their ``slots``; the store is updated.

        Args:
            block_table: ``[n, max_blocks]`` the step's table, possibly cut to its longest row.
            slots: ``[n]`` int64 slot of each row; reselect: ``[n]`` from :meth:`ReuseBook.step`.
            table_width: the width of the uncut table (the stored lists are kept at that width's selection width).
            keys: ``key_cache`` / ``scale`` / ``candidate_keys`` for a two-stage selection (``ops.select``).
        """
        sizes = ops.select_sizes(config, block_size)
        stored_idx, stored_count = self.buffers(selection_width(table_width, **sizes))
        width = selection_width(block_table.shape[1], **sizes)
        if backend == "triton" and config.rerank_candidates <= 1:  # the kernel writes the rows' slots in place
            store = ops.Selection(stored_idx[:, :, :width], stored_count)
            ops.select(backend, q, reprs, block_table, seq_lens, config, block_size, kept=store, reselect=reselect,
                       sel_rows=slots, **keys)
            return ops.Selection(store.sel_idx.index_select(0, slots), store.sel_count.index_select(0, slots))
        kept = ops.Selection(stored_idx[slots, :, :width], stored_count[slots])
        ops.select(backend, q, reprs, block_table, seq_lens, config, block_size, kept=kept, reselect=reselect,
                   **keys)
        stored_idx[slots, :, :width] = kept.sel_idx
        stored_count[slots] = kept.sel_count
        return kept


class RequestReuse:
    """Selection reuse for callers that name their requests (:class:`ucm_sparse.GSA`, the offload mode): a slot per
    request id (:class:`SlotMap`), which rows reselect (:class:`ReuseBook`, remade with every row reselecting when
    the requests outgrow it), and each layer's lists (:class:`SelectionStore`).

    Args:
        every: ``select_every``; block_size: tokens per KV block.
    """

    def __init__(self, every: int, block_size: int):
        self.every, self.block_size = every, block_size
        self._slots = SlotMap()
        self._book: ReuseBook | None = None
        self._stores: dict = {}  # layer -> (its SelectionStore, the step its lists are of, their table width)
        self._slot_rows: tuple[list, torch.Tensor | None] = ([], None)  # the last step's slots, and on the device

    def step(self, request_ids: list, seq_lens: torch.Tensor, block_table: torch.Tensor,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, reselect)`` of one decode step: ``[n]`` int64 slot of each request and ``[n]`` int32, 1 where
        the row selects afresh (:meth:`ReuseBook.step`'s arguments; both on the table's device)."""
        device = block_table.device
        slots = self._device_slots(self._slots.assign(request_ids), device)
        if self._book is None or self._book.slots < self._slots.capacity:
            self._book = ReuseBook(self.every, self._slots.capacity, self.block_size, device)
            self._stores.clear()
        return slots, self._book.step(seq_lens, block_table, slots, width)

    def _device_slots(self, slots: list, device: torch.device) -> torch.Tensor:
        """``slots`` as an int64 tensor on ``device``: the last step's tensor when they are the same (a steady batch
        copies nothing to the device and so does not wait for it)."""
        known, tensor = self._slot_rows
        if slots != known or tensor is None or tensor.device != device:
            tensor = torch.tensor(slots, dtype=torch.long, device=device)
            self._slot_rows = slots, tensor
        return tensor

    def select(self, layer, step: int, backend: str, q: torch.Tensor, reprs: tuple, block_table: torch.Tensor,
               seq_lens: torch.Tensor, config: GSAConfig, slots: torch.Tensor, reselect: torch.Tensor,
               table_width: int, **keys) -> ops.Selection:
        """``layer``'s lists at decode step ``step`` (:meth:`SelectionStore.select`); every row reselects when
        the layer's stored lists are not of the step before or of this table width (then they are dropped)."""
        store, written, width = self._stores.get(layer, (None, -1, table_width))
        if store is None or width != table_width:
            store = SelectionStore(self._book.capacity, reprs[0].shape[1], q.device)
        self._stores[layer] = store, step, table_width
        if written != step - 1 or width != table_width:  # it skipped a step (ran dense, or not at all) or widened
            reselect = torch.ones_like(reselect)
        return store.select(backend, q, reprs, block_table, seq_lens, config, self.block_size, slots, reselect,
                            table_width, **keys)

    def finish(self, request_id) -> None:
        """The request ended: its slot is free and whatever takes it next selects afresh."""
        slot = self._slots.release(request_id)
        if slot is not None and self._book is not None:
            self._book.forget(slot)
