"""Scheduler-side bookkeeping of the UCM connector: which prompt blocks to load and which to save.

Pure bookkeeping over duck-typed vLLM objects (a request has ``request_id``, ``prompt_token_ids``,
``lora_request``, ``cache_salt``, ``mm_features``); the bytes move in ``worker.py``. Block ids are UCM's own
chained hashes (``ucm_store.hashing``), deterministic across processes, never vLLM's seeded hashes.

A load is synchronous (done before the forward pass of the step that schedules the request) or asynchronous
(vLLM parks the request until the worker reports the load finished); ``load_async`` picks, per request, from the
tiers the lookup found the hit blocks in (see :func:`loads_async`). vLLM's ``kv_role`` is honoured: a
``kv_consumer`` only loads, a ``kv_producer`` only saves, ``kv_both`` does both.
"""
import dataclasses
from collections import OrderedDict

from ucm_store.backends.cache import CacheTier
from ucm_store.config import LOAD_ASYNC_CHOICES
from ucm_store.hashing import BlockHasher


@dataclasses.dataclass
class BlockTransfer:
    """Blocks of one request to move in one step: store ids and the vLLM block ids they map to."""

    req_id: str
    block_hashes: list[bytes]
    vllm_block_ids: list[int]


@dataclasses.dataclass
class _RequestState:
    hashes: list[bytes]  # ids of the prompt's full blocks
    block_ids: list[int] = dataclasses.field(default_factory=list)  # vLLM blocks allocated so far
    saved_blocks: int = 0  # leading prompt blocks already in the store (hit, or saved)
    local_tokens: int = 0  # tokens vLLM's own prefix cache had at the last lookup
    hit_blocks: int = 0  # leading prompt blocks found in the store at the last lookup
    load_async: bool = False  # whether the last lookup's hits load between steps
    saved_any: bool = False  # whether a step's metadata carried a save of its blocks


class SchedulerBookkeeping:
    """Per-request state between lookups, allocation and the per-step metadata."""

    def __init__(self, hasher: BlockHasher, lookup_prefix_tiers, load_async: str = "auto", *, loads: bool = True,
                 saves: bool = True):
        """``lookup_prefix_tiers(block_ids) -> list[str]``: the tier names of the leading run of hits (as
        ``UcmPipelineStore.lookup_prefix_tiers``); ``load_async``: one of ``LOAD_ASYNC_CHOICES``; ``loads`` /
        ``saves``: whether this engine loads hits from the store / saves its prompt blocks (vLLM's kv_role)."""
        assert load_async in LOAD_ASYNC_CHOICES, load_async  # StoreConfig validated it
        self.hasher = hasher
        self.loads, self.saves = loads, saves
        self.block_size = hasher.block_size
        self.load_async = load_async
        self._lookup_prefix_tiers = lookup_prefix_tiers
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: list[BlockTransfer] = []
        self._pending_async_loads: list[BlockTransfer] = []

    def num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` whose KV the store holds (whole blocks; never the last token),
        and whether they load asynchronously (never when there are none)."""
        state = self._state(request)
        if not self.loads:
            return 0, False
        usable = (len(request.prompt_token_ids) - 1) // self.block_size
        tiers = self._lookup_prefix_tiers(state.hashes[:usable]) if usable else []
        state.hit_blocks = len(tiers)
        state.local_tokens = num_computed_tokens
        tokens = max(0, state.hit_blocks * self.block_size - num_computed_tokens)
        first = num_computed_tokens // self.block_size
        state.load_async = tokens > 0 and loads_async(self.load_async, tiers[first:])
        return tokens, state.load_async

    def after_alloc(self, request, block_ids: list[int], num_external_tokens: int) -> None:
        """Record the blocks vLLM allocated; queue the load of the external hit range (a second call for an
        asynchronous load, once it has finished, only records the blocks: ``num_external_tokens`` is 0)."""
        state = self._state(request)
        state.block_ids = list(block_ids)
        state.saved_blocks = max(state.saved_blocks, state.hit_blocks)
        if num_external_tokens <= 0:
            return
        first = state.local_tokens // self.block_size
        last = first + num_external_tokens // self.block_size
        transfer = BlockTransfer(request.request_id, state.hashes[first:last], state.block_ids[first:last])
        (self._pending_async_loads if state.load_async else self._pending_loads).append(transfer)

    def step(self, new_requests, cached_requests, num_scheduled_tokens: dict[str, int]):
        """Loads and asynchronous loads queued since the last step, and saves of prompt blocks that this step
        completes: ``(loads, async_loads, saves)``, three lists of :class:`BlockTransfer`."""
        for new in new_requests:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
        for i, req_id in enumerate(cached_requests.req_ids):
            state, new_ids = self._requests.get(req_id), cached_requests.new_block_ids[i]
            if state is not None and new_ids is not None:
                resumed = req_id in cached_requests.resumed_req_ids
                state.block_ids = list(new_ids[0]) if resumed else state.block_ids + list(new_ids[0])
        saves = self._saves(new_requests, cached_requests, num_scheduled_tokens)
        loads, self._pending_loads = self._pending_loads, []
        async_loads, self._pending_async_loads = self._pending_async_loads, []
        return loads, async_loads, saves

    def finished(self, request_id: str) -> bool:
        """Forget a finished request; whether any step saved blocks of it."""
        state = self._requests.pop(request_id, None)
        return state is not None and state.saved_any

    def _saves(self, new_requests, cached_requests, num_scheduled_tokens) -> list[BlockTransfer]:
        if not self.saves:
            return []
        computed = {new.req_id: new.num_computed_tokens for new in new_requests}
        computed.update(zip(cached_requests.req_ids, cached_requests.num_computed_tokens))
        saves = []
        for req_id, done in computed.items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            full = min((done + num_scheduled_tokens.get(req_id, 0)) // self.block_size, len(state.hashes),
                       len(state.block_ids))
            if full > state.saved_blocks:
                saves.append(BlockTransfer(req_id, state.hashes[state.saved_blocks:full],
                                           state.block_ids[state.saved_blocks:full]))
                state.saved_blocks = full
                state.saved_any = True
        return saves

    def _state(self, request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            blocks = self.hasher.block_ids(request.prompt_token_ids, extra_keys=request_extra_keys(request))
            state = _RequestState(blocks)
            self._requests[request.request_id] = state
        return state


class RecentIds:
    """The last ``capacity`` distinct ids added, oldest forgotten first: the scheduler's picture of what the worker's
    Cache tier holds of the blocks it reported saved (that tier keeps at most ``cache_capacity`` blocks)."""

    def __init__(self, capacity: int):
        assert capacity >= 1, capacity
        self.capacity = capacity
        self._ids: OrderedDict[bytes, None] = OrderedDict()

    def add(self, ids) -> None:
        """Remember ``ids`` as the newest."""
        for block_id in ids:
            self._ids[block_id] = None
            self._ids.move_to_end(block_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, block_id) -> bool:
        return block_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


def loads_async(policy: str, tiers: list[str]) -> bool:
    """Whether hit blocks found in ``tiers`` (one tier name per block to load) load asynchronously under
    ``policy``: ``always``, ``never``, or ``auto``: when any block would be read from below the Cache tier (I/O:
    disk, network) rather than copied from pinned DRAM."""
    if policy == "auto":
        return any(tier != CacheTier.name for tier in tiers)
    return policy == "always"


def request_extra_keys(request) -> tuple:
    """What besides the tokens makes a request's KV differ: LoRA adapter, cache salt, multimodal inputs."""
    keys = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        keys.append(f"lora:{lora.lora_name}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        keys.append(f"salt:{salt}")
    keys += [f"mm:{feature.identifier}" for feature in getattr(request, "mm_features", None) or []]
    return tuple(keys)
