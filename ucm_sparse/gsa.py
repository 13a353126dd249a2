"""GSA on a paged KV cache in device memory: ``plan()`` once per decode step, ``run()`` once per layer.

    gsa = GSA(GSAConfig(sparse_ratio=0.3), block_size=16)
    plan = gsa.plan(request_ids, seq_lens, block_table)       # once per step: shared by every layer
    for layer in range(num_layers):
        out = gsa.run(plan, layer, q[layer], key_cache[layer], value_cache[layer])
    gsa.finish(request_id)                                      # when a request ends

The plan holds what a step's layers share: the lengths, the block table cut to the longest request, the blocks that
became full since the previous step (their representations are computed by each layer's ``run``), the block count
each request attends, and whether the whole batch is still dense (then ``run`` is plain dense attention). ``run``
updates the layer's block representations, selects (or takes ``selection=`` computed earlier, e.g. by another layer)
and attends; the selection stays in ``plan.selections[layer]``. With ``select_every > 1`` a request keeps each
layer's selection for up to that many steps (:mod:`ucm_sparse.reuse`): the plan says which rows select afresh,
and with ``select_drift`` each layer also reselects the rows whose queries turned since its last selection.
:func:`sparse_attention` is the one-call form for a notebook.
"""
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from ucm_kernels._utils import check_positive_int
from ucm_kernels.block_repr import blocks_filled

from . import ops
from .config import GSAConfig
from .ops import Selection
from .reuse import RequestReuse, ReuseStep
from .state import RequestTable


@dataclass
class GSAPlan:
    """One decode step's shared work (see the module docstring); made by :meth:`GSA.plan`."""

    step: int
    request_ids: list
    seq_lens: torch.Tensor  # [batch] int32, tokens per request including the current one
    block_table: torch.Tensor  # [batch, max_blocks] int32, columns cut to the longest request
    filled: torch.Tensor  # [n] physical ids of the blocks that became full since the previous step
    counts: list[int]  # blocks each request attends
    dense: bool  # every request attends all of its blocks
    selections: dict = field(default_factory=dict)  # layer -> Selection, filled by run(); with reuse, may view the
    # kept lists that a later step overwrites (clone to keep)
    reuse: ReuseStep | None = None  # each request's slot and whether it selects afresh (selection reuse only)
    table_width: int = 0  # block_table.shape[1] as given (the stored selections' width follows it)
    launch_plans: dict = field(default_factory=dict)  # selection's and attention's, made by a shape's first layer


class GSA:
    """Block-sparse decode attention over a paged KV cache with per-request state (on-device mode).

    Args:
        config: the GSA settings (``offload`` must be off: see ``ucm_sparse.offload.OffloadedGSA``).
        block_size: tokens per KV block of the caches ``run`` is given.
        backend: ``"auto"`` (Triton kernels for bf16/fp16 CUDA tensors, torch otherwise), ``"triton"``, ``"torch"``.
    """

    def __init__(self, config: GSAConfig | None = None, *, block_size: int, backend: str = "auto"):
        config = config or GSAConfig()
        if config.offload:
            raise ValueError("config.offload is True: on-device GSA keeps the KV on the device; use "
                             "ucm_sparse.OffloadedGSA for the offload mode")
        check_positive_int("block_size", block_size)
        ops.check_backend(backend)
        self.config, self.block_size, self.backend = config, block_size, backend
        self.requests = RequestTable()
        self._reprs: dict[Hashable, tuple] = {}
        self._step = 0
        self._reuse = RequestReuse(config.select_every, block_size)

    def plan(self, request_ids: Sequence[Hashable], seq_lens: torch.Tensor | Sequence[int],
             block_table: torch.Tensor) -> GSAPlan:
        """Plan one decode step of the batch (one host read of ``seq_lens``); reuse the plan for every layer.

        Args:
            request_ids: one hashable id per batch row; ids not seen before start a new request.
            seq_lens: ``[batch]`` tokens per request including the current one (tensor or list).
            block_table: ``[batch, max_blocks]`` int32 logical -> physical block, on the caches' device.
        """
        lengths = [int(n) for n in (seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens)]
        _check_batch(request_ids, lengths, block_table, self.block_size)
        before = self.requests.advance(list(request_ids), lengths)
        nbs = [-(-n // self.block_size) for n in lengths]
        table = block_table[:, :max(nbs, default=0)]
        device = block_table.device
        lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        filled = blocks_filled(torch.tensor(before, dtype=torch.int32, device=device), lens, table, self.block_size)
        counts = [ops.num_selected(nb, self.config, self.block_size) for nb in nbs]
        self._step += 1
        plan = GSAPlan(self._step, list(request_ids), lens, table, filled, counts,
                       dense=all(c == nb for c, nb in zip(counts, nbs)), table_width=block_table.shape[1])
        if self.config.select_every > 1 and not plan.dense:  # a dense step selects nothing: the next reselects
            plan.reuse = self._reuse.step(plan.request_ids, lengths, block_table.shape[1], device)
        return plan

    def run(self, plan: GSAPlan, layer: Hashable, q: torch.Tensor, key_cache: torch.Tensor,
            value_cache: torch.Tensor, *, scale: float | None = None, selection: Selection | None = None
            ) -> torch.Tensor:
        """Attention output of one layer for this step: ``[batch, num_q_heads, head_dim]`` in q's dtype.

        Args:
            plan: this step's plan (the latest :meth:`plan`). The block table given to :meth:`plan` must not
                change during the step: attention that reads no list written this step (dense layers, lists kept
                from an earlier step) is launched with ``inputs_ready`` and may read the table while the kernel
                ahead of it still runs.
            layer: any hashable layer key; each layer keeps its own block representations. An int key below
                ``config.dense_first_layers`` is a dense layer (every block attended).
            q: ``[batch, num_q_heads, head_dim]``, the current token's queries.
            key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any strides) holding
                every token of every request, the current one included.
            scale: softmax scale (default ``head_dim ** -0.5``).
            selection: reuse this selection instead of selecting (e.g. the one another layer made this step); with
                ``select_every > 1`` such a layer selects afresh at the next step it selects itself.
        """
        if plan.step != self._step:
            raise ValueError(f"plan is from step {plan.step}; the latest plan is step {self._step}")
        _check_layer_inputs(q, key_cache, value_cache, plan, self.block_size)
        backend = ops.resolve_backend(self.backend, q)
        sparse_layer = self.config.sparse_layer(layer)
        if sparse_layer:  # summaries stay current while the batch is dense, for the steps that are not
            ops.update_reprs(backend, key_cache, plan.filled, self._layer_reprs(layer, key_cache))
        if plan.dense or not sparse_layer:
            plan.selections[layer] = ops.full_selection(plan.seq_lens, key_cache.shape[2], self.block_size,
                                                        plan.block_table.shape[1])
            return ops.attend(backend, q, key_cache, value_cache, plan.block_table, plan.seq_lens, None, scale,
                              plan.launch_plans, inputs_ready=True)
        ready = False  # the lists were written before the kernel ahead: kept lists read in place
        if selection is None:
            ready = plan.reuse is not None and plan.reuse.span is not None and self._reuse.kept_as_they_are(
                layer, plan.step, plan.reuse, plan.table_width, self.config)
            selection = self._select(backend, plan, layer, q, key_cache, scale)
        plan.selections[layer] = selection
        return ops.attend(backend, q, key_cache, value_cache, plan.block_table, plan.seq_lens, selection, scale,
                          plan.launch_plans, inputs_ready=ready)

    def finish(self, request_id: Hashable) -> None:
        """Forget a finished request (its blocks' representations are recomputed when blocks are reused)."""
        self.requests.finish(request_id)
        self._reuse.finish(request_id)

    def _select(self, backend: str, plan: GSAPlan, layer: Hashable, q: torch.Tensor, key_cache: torch.Tensor,
                scale: float | None) -> Selection:
        """This step's selection of ``layer``: made afresh, or (selection reuse) for the rows the plan names, the
        others keeping the lists stored in their slots."""
        keys = dict(key_cache=key_cache, scale=scale)
        if plan.reuse is None:
            return ops.select(backend, q, self._reprs[layer], plan.block_table, plan.seq_lens, self.config,
                              self.block_size, plans=plan.launch_plans, **keys)
        return self._reuse.select(layer, plan.step, backend, q, self._reprs[layer], plan.block_table, plan.seq_lens,
                                  self.config, plan.reuse, plan.table_width, plans=plan.launch_plans, **keys)

    def _layer_reprs(self, layer: Hashable, key_cache: torch.Tensor) -> tuple:
        reprs = self._reprs.get(layer)
        if reprs is None:
            num_blocks, _, heads, head_dim = key_cache.shape
            reprs = self._reprs[layer] = ops.empty_reprs(num_blocks, heads, head_dim, key_cache.dtype, self.config,
                                                         key_cache.device)
        elif reprs[0].shape != (key_cache.shape[0], *key_cache.shape[2:]) or reprs[0].device != key_cache.device:
            raise ValueError(f"key_cache: shape {tuple(key_cache.shape)} on {key_cache.device}, but layer {layer!r} "
                             f"was first run with {reprs[0].shape[0]} blocks of [{reprs[0].shape[1]}, "
                             f"{reprs[0].shape[2]}] on {reprs[0].device}")
        return reprs


def sparse_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor | Sequence[int],
                     config: GSAConfig | None = None, *, scale: float | None = None, backend: str = "auto"
                     ) -> tuple[torch.Tensor, Selection]:
    """GSA decode attention in one call, on plain tensors: ``(out, selection)``.

    Computes the representation of every full block of the listed requests, selects per (request, KV head) and
    attends. Shapes as in :meth:`GSA.run`; ``seq_lens`` ``[batch]`` counts the current token. ``out`` is
    ``[batch, num_q_heads, head_dim]`` in q's dtype; ``selection`` names the logical blocks attended (all of
    them for a request that stays dense). For a decode loop, keep a :class:`GSA` instead (no recomputation).
    ``config.dense_first_layers`` does not apply here: the call names no layer.
    """
    gsa = GSA(config, block_size=key_cache.shape[1], backend=backend)
    plan = gsa.plan(list(range(q.shape[0])), seq_lens, block_table)
    out = gsa.run(plan, None, q, key_cache, value_cache, scale=scale)  # no layer index: dense_first_layers unused
    return out, plan.selections[None]


def _check_batch(request_ids: Sequence, lengths: list[int], block_table: torch.Tensor, block_size: int) -> None:
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table: got shape {tuple(block_table.shape)} dtype {block_table.dtype}, expected "
                         "an int32 [batch, max_blocks] tensor")
    if not len(request_ids) == len(lengths) == block_table.shape[0]:
        raise ValueError(f"request_ids ({len(request_ids)}), seq_lens ({len(lengths)}) and block_table rows "
                         f"({block_table.shape[0]}) must all have one entry per request")
    for i, n in enumerate(lengths):
        if n < 1 or -(-n // block_size) > block_table.shape[1]:
            raise ValueError(f"seq_lens[{i}]: {n} tokens; expected 1..{block_table.shape[1] * block_size} "
                             f"(block_table has {block_table.shape[1]} blocks of {block_size})")


def _check_layer_inputs(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, plan: GSAPlan,
                        block_size: int) -> None:
    if q.dim() != 3 or q.shape[0] != len(plan.request_ids):
        raise ValueError(f"q: got shape {tuple(q.shape)}, expected [batch={len(plan.request_ids)}, num_q_heads, "
                         "head_dim]")
    if key_cache.dim() != 4 or key_cache.shape[1] != block_size or key_cache.shape[3] != q.shape[2] \
            or q.shape[1] % key_cache.shape[2]:
        raise ValueError(f"key_cache: got shape {tuple(key_cache.shape)}, expected [num_blocks, {block_size}, "
                         f"num_kv_heads dividing {q.shape[1]}, {q.shape[2]}]")
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"value_cache: got shape {tuple(value_cache.shape)} dtype {value_cache.dtype}, expected "
                         f"key_cache's {tuple(key_cache.shape)} {key_cache.dtype}")
    for name, tensor in (("key_cache", key_cache), ("value_cache", value_cache)):
        if tensor.device != q.device or tensor.dtype != q.dtype:
            raise ValueError(f"{name}: {tensor.dtype} on {tensor.device}, expected q's {q.dtype} on {q.device}")
    if plan.block_table.device != q.device:
        raise ValueError(f"block_table is on {plan.block_table.device}, expected q's device {q.device}")
