"""Selection reuse (``GSAConfig.select_every``): which rows of a decode step select afresh, and where each layer's
selections are kept between steps.

Each running request has a slot: :class:`SlotMap` gives one per request id (:class:`RequestReuse`, which serves
:class:`ucm_sparse.GSA` and the offload mode and decides on the host, so a step where no row reselects launches no
selection); inside vLLM, whose batches name no request, :meth:`ReuseBook.tail_slots` finds a row's slot by its last
physical block, and :class:`ReuseBook` decides on the device with no host read, so a CUDA graph replays the
selection kernels with each step's mask.
That block is partly filled, so no other running request holds it, and a request keeps it for ``block_size``
steps: it identifies the request whatever row the request lands in (vLLM moves rows as requests finish; batches
may take turns). A row keeps its previous selection while all of these hold:

* its request grew by exactly one token since its slot's last step, its block count did not change, and its
  last block is the same physical block;
* the selection is younger than ``select_every`` steps;
* the block table has the width it had (the stored lists are kept per width);
* with the drift rule (``select_drift``), per layer: the row's queries have not turned past ``select_drift`` from
  those the layer's lists were selected with (:mod:`ucm_kernels.query_drift`, one launch a layer; decided on the
  device, so with the rule a step launches the selection at every layer, its programs of kept rows returning at
  once).

So a request reselects at least every ``select_every`` steps and whenever a block fills (every ``block_size``
tokens): the lists it reuses always name its current blocks, and the block of the current token is attended
because it was already its last block.
"""
from dataclasses import dataclass

import torch

from ucm_kernels._utils import padded_empty
from ucm_kernels.block_select import selection_width
from ucm_kernels.query_drift import query_drift, torch_query_drift
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
    reselect, as a new :class:`ReuseBook` makes them); with the drift rule (``GSAConfig.select_drift``) also each
    slot's query at its last selection."""

    def __init__(self, slots: int, num_kv_heads: int, device: torch.device | str):
        self.slots, self.num_kv_heads, self.device = slots, num_kv_heads, device
        self._by_width: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._queries: torch.Tensor | None = None

    def buffers(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sel_idx, sel_count)`` of every slot for lists ``width`` wide (allocated at the first call)."""
        if width not in self._by_width:  # rows padded to 16 entries: strides stay in one kernel specialisation
            self._by_width[width] = (
                padded_empty(self.slots, self.num_kv_heads, width, dtype=torch.int32, device=self.device).fill_(-1),
                torch.zeros(self.slots, self.num_kv_heads, dtype=torch.int32, device=self.device))
        return self._by_width[width]

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """``[slots, num_q_heads, head_dim]`` each slot's query at its last selection, in q's dtype (see
        :meth:`queries_of`)."""
        return self.queries_of(q.shape[1], q.shape[2], q.dtype)

    def queries_of(self, num_q_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The kept queries ``[slots, num_q_heads, head_dim]`` of ``dtype``: zeros (drift 1) until a selection
        writes them, made at the first call and remade when the shape or dtype changes (a CUDA-graph caller makes
        them before capturing)."""
        shape = (self.slots, num_q_heads, head_dim)
        if self._queries is None or self._queries.shape != shape or self._queries.dtype != dtype:
            self._queries = torch.zeros(shape, dtype=dtype, device=self.device)
        return self._queries

    def drifted(self, backend: str, q: torch.Tensor, slots: torch.Tensor, reselect: torch.Tensor | None,
                threshold: float, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layer's ``reselect`` under the drift rule (``ucm_kernels.query_drift``): ``[n]`` int32, 1 where the
        step reselects the row (``reselect``, ``[n]`` int32) or its queries (``q [n, num_q_heads, head_dim]``)
        drifted past ``threshold`` from its slot's; those rows' queries are kept as their slots'. With ``reselect``
        None (every row selects) the queries are kept and None is returned."""
        kept = self.queries(q)
        if reselect is None:
            kept[slots] = q
            return None
        drift = query_drift if backend == "triton" else torch_query_drift
        return drift(q, kept, slots, reselect, threshold=threshold, out=out)

    def select(self, backend: str, q: torch.Tensor, reprs: tuple, block_table: torch.Tensor, seq_lens: torch.Tensor,
               config: GSAConfig, block_size: int, slots: torch.Tensor, reselect: torch.Tensor | None,
               table_width: int, *, span: slice | None = None, **keys) -> ops.Selection:
        """This step's lists of a layer (``ucm_sparse.ops.select`` arguments): the rows ``reselect`` names select
        afresh, the others attend the lists stored in their ``slots``; the store is updated.

        Args:
            block_table: ``[n, max_blocks]`` the step's table, possibly cut to its longest row.
            slots: ``[n]`` int64 slot of each row; span: the same slots as a slice, when they are consecutive and
                ascending (the lists are then returned as a view of the store, see :meth:`lists`).
            reselect: ``[n]`` int32 from :meth:`ReuseBook.step`, or None: every row selects afresh. With
                ``config.select_drift`` the rows whose queries drifted select afresh too (:meth:`drifted`).
            table_width: the width of the uncut table (the stored lists are kept at that width's selection width).
            keys: ``key_cache`` / ``scale`` / ``candidate_keys`` for a two-stage selection (``ops.select``).
        """
        if config.select_drift is not None:
            reselect = self.drifted(backend, q, slots, reselect, config.select_drift)
        stored_width, width = _widths(config, block_size, table_width, block_table)
        stored_idx, stored_count = self.buffers(stored_width)
        if backend == "triton" and config.rerank_candidates <= 1:  # the kernel writes the rows' slots in place
            ops.select(backend, q, reprs, block_table, seq_lens, config, block_size,
                       kept=ops.Selection(stored_idx[:, :, :width], stored_count), reselect=reselect, sel_rows=slots,
                       **keys)
            return self.lists(slots, stored_width, width, span)
        kept = None if reselect is None else ops.Selection(stored_idx[slots, :, :width], stored_count[slots])
        kept = ops.select(backend, q, reprs, block_table, seq_lens, config, block_size, kept=kept, reselect=reselect,
                          **keys)
        stored_idx[slots, :, :width] = kept.sel_idx
        stored_count[slots] = kept.sel_count
        return kept

    def lists(self, slots: torch.Tensor, stored_width: int, width: int, span: slice | None = None
              ) -> ops.Selection:
        """The stored lists of ``slots`` (``[n]`` int64), cut to ``width``: ``sel_idx [n, num_kv_heads, width]``,
        ``sel_count [n, num_kv_heads]``. With ``span`` (the slots as a slice) a view of the store, which the
        layer's next selection overwrites; else a copy."""
        stored_idx, stored_count = self.buffers(stored_width)
        if span is not None:
            return ops.Selection(stored_idx[span, :, :width], stored_count[span])
        return ops.Selection(stored_idx[:, :, :width].index_select(0, slots), stored_count.index_select(0, slots))


@dataclass
class ReuseStep:
    """One decode step of selection reuse for named requests (:meth:`RequestReuse.step`)."""

    slots: torch.Tensor  # [n] int64 each request's slot, on the block table's device
    reselect: list[int]  # 1 where the row selects afresh, on the host
    span: slice | None  # the slots as a slice when they are consecutive and ascending
    _rows: torch.Tensor | None = None

    def rows(self) -> torch.Tensor:
        """``reselect`` as ``[n]`` int32 on the slots' device, copied at the first call (a step where some rows
        reselect and others reuse needs it, and with the drift rule any step where not every row reselects)."""
        if self._rows is None:
            self._rows = torch.tensor(self.reselect, dtype=torch.int32, device=self.slots.device)
        return self._rows


class RequestReuse:
    """Selection reuse for callers that name their requests (:class:`ucm_sparse.GSA`, the offload mode): a slot per
    request id (:class:`SlotMap`), which rows reselect (decided on the host, by the request's id: the rule of
    :class:`ReuseBook` without its last-block check, which only serves to find unnamed rows' slots), and each
    layer's lists (:class:`SelectionStore`). Knowing on the host which rows reselect lets a step where none does
    launch no selection at all (unless the drift rule must check the layer's queries), and a step where all do
    select without a mask.

    Args:
        every: ``select_every``; block_size: tokens per KV block.
    """

    def __init__(self, every: int, block_size: int):
        self.every, self.block_size = every, block_size
        self._slots = SlotMap()
        self._capacity = 0  # the slot count the stores are sized for
        self._seen: dict[int, tuple[int, int]] = {}  # slot -> (its tokens at its last step, its lists' age)
        self._width = -1  # the table width of the previous step
        self._stores: dict = {}  # layer -> (its SelectionStore, the step its lists are of, their table width)
        self._slot_rows: tuple[list, torch.Tensor | None] = ([], None)  # the last step's slots, and on the device

    def step(self, request_ids: list, lengths: list[int], width: int, device: torch.device | str) -> ReuseStep:
        """Record one decode step of ``request_ids`` (``lengths``: their tokens, the current one included) over a
        block table ``width`` blocks wide (all rows reselect when it changes); a row keeps its lists while its
        request grew by one token within its last block and the lists are younger than ``every`` steps."""
        slots = self._slots.assign(request_ids)
        if self._slots.capacity != self._capacity:  # the stores are remade at the new size: every row reselects
            self._capacity = self._slots.capacity
            self._seen.clear()
            self._stores.clear()
        same_width, self._width = width == self._width, width
        reselect = [self._record(slot, length, same_width) for slot, length in zip(slots, lengths)]
        first = slots[0] if slots else 0
        span = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None
        return ReuseStep(self._device_slots(slots, torch.device(device)), reselect, span)

    def _record(self, slot: int, length: int, same_width: bool) -> int:
        """1 if the request in ``slot``, now ``length`` tokens long, selects afresh; its state is updated."""
        before, age = self._seen.get(slot, (-1, 0))
        blocks = -(-length // self.block_size)
        keep = (same_width and length == before + 1 and blocks == -(-before // self.block_size)
                and age + 1 < self.every)
        self._seen[slot] = (length, age + 1 if keep else 0)
        return 0 if keep else 1

    def _device_slots(self, slots: list, device: torch.device) -> torch.Tensor:
        """``slots`` as an int64 tensor on ``device``: the last step's tensor when they are the same (a steady batch
        copies nothing to the device and so does not wait for it)."""
        known, tensor = self._slot_rows
        if slots != known or tensor is None or tensor.device != device:
            tensor = torch.tensor(slots, dtype=torch.long, device=device)
            self._slot_rows = slots, tensor
        return tensor

    def select(self, layer, step: int, backend: str, q: torch.Tensor, reprs: tuple, block_table: torch.Tensor,
               seq_lens: torch.Tensor, config: GSAConfig, reuse: ReuseStep, table_width: int, **keys
               ) -> ops.Selection:
        """``layer``'s lists at decode step ``step`` (:meth:`SelectionStore.select`; nothing is launched to select
        when no row reselects and there is no drift rule); every row reselects when the layer's stored lists are
        not of the step before or of this table width (then they are dropped)."""
        kept_as_they_are = self.kept_as_they_are(layer, step, reuse, table_width, config)
        store, written, width = self._stores.get(layer, (None, -1, table_width))
        if store is None or width != table_width:
            store = SelectionStore(self._capacity, reprs[0].shape[1], q.device)
        self._stores[layer] = store, step, table_width
        if kept_as_they_are:
            return store.lists(reuse.slots, *_widths(config, self.block_size, table_width, block_table), reuse.span)
        every_row = written != step - 1 or width != table_width or all(reuse.reselect)
        return store.select(backend, q, reprs, block_table, seq_lens, config, self.block_size, reuse.slots,
                            None if every_row else reuse.rows(), table_width, span=reuse.span, **keys)

    def kept_as_they_are(self, layer, step: int, reuse: ReuseStep, table_width: int, config: GSAConfig) -> bool:
        """Whether :meth:`select` of ``layer`` at ``step`` launches nothing: no row reselects, there is no drift
        rule, and the layer's stored lists are of the step before at this table width (asked before the call)."""
        store, written, width = self._stores.get(layer, (None, -1, table_width))
        return (store is not None and written == step - 1 and width == table_width and not any(reuse.reselect)
                and config.select_drift is None)

    def finish(self, request_id) -> None:
        """The request ended: its slot is free and whatever takes it next selects afresh."""
        slot = self._slots.release(request_id)
        if slot is not None:
            self._seen.pop(slot, None)


def _widths(config: GSAConfig, block_size: int, table_width: int, block_table: torch.Tensor) -> tuple[int, int]:
    """(the width lists are stored at for an uncut block table ``table_width`` blocks wide, the width of this
    step's lists over ``block_table``, possibly cut to its longest row)."""
    sizes = ops.select_sizes(config, block_size)
    return selection_width(table_width, **sizes), selection_width(block_table.shape[1], **sizes)
