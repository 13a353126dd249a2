"""GSA offload mode (ucm_sparse.offload, ucm_sparse.hot_pool): bit-exact against on-device GSA over the same tokens,
synchronous misses counted, prefetch bounded by max_pending_prefetch, the host KV held by the store's Cache tier."""
import weakref

import pytest
import torch

from ucm_kernels._launch import LAUNCHERS
from ucm_kernels.block_select import selection_width
from ucm_sparse import GSA, GSAConfig, ops
from ucm_sparse.offload import OffloadedGSA
from ucm_store.backends.cache import CacheTier
from ucm_store.pool import PinnedMemoryPool

BLOCK, HEADS, GROUP, DIM, LAYERS, DTYPE = 16, 2, 2, 32, 2, torch.bfloat16
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels take CUDA tensors only
SPARSE = dict(sparse_ratio=0.3, init_window_sz=1, local_window_sz=2, min_blocks=3)


def private_cache(layers: int = LAYERS) -> CacheTier:
    return CacheTier(layers, PinnedMemoryPool(1 << 20, 64 << 20, pinned=torch.cuda.is_available()))


class Twin:
    """The same requests decoded by on-device GSA (a paged cache) and by OffloadedGSA; outputs compared.
    Random values are drawn on the CPU (same sequence on every device), then moved to ``device``; both attend with
    the softmax ``scale`` (None: head_dim ** -0.5)."""

    def __init__(self, config: GSAConfig, prompts: dict, steps: int = 40, seed: int = 0, backend: str = "torch",
                 device: str = "cpu", scale: float | None = None, table_width: int | None = None, layers: int = LAYERS):
        self.gen = torch.Generator().manual_seed(seed)
        self.device, self.scale, self.table_width, self.layers = device, scale, table_width, layers
        capacity = sum(-(-(n + steps) // BLOCK) for n in prompts.values())
        self.kv = [torch.zeros(2, capacity + 3, BLOCK, HEADS, DIM, dtype=DTYPE, device=device) for _ in range(layers)]
        self.physical = torch.randperm(capacity + 3, generator=self.gen).tolist()
        self.blocks: dict = {}
        self.lens = dict(prompts)
        self.queries = {(r, layer): self.random(HEADS * GROUP, DIM).float() for r in prompts for layer in range(layers)}
        self.device_gsa = GSA(config, block_size=BLOCK, backend=backend)
        self.offload = OffloadedGSA(config, num_layers=layers, num_kv_heads=HEADS, head_dim=DIM, block_size=BLOCK,
                                    host_blocks=capacity + 2, dtype=DTYPE, device=device, cache=private_cache(layers),
                                    backend=backend)
        for request, n in prompts.items():
            self.blocks[request] = [self.physical.pop() for _ in range(-(-n // BLOCK))]
            for layer in range(layers):
                keys, values = self.random(n, HEADS, DIM), self.random(n, HEADS, DIM)
                for position in range(n):
                    self.put(layer, request, position, keys[position], values[position])
                self.offload.write_prompt(request, layer, keys, values)

    def random(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(DTYPE).to(self.device)

    def query(self, request, layer: int) -> torch.Tensor:
        """A request's query drifts from step to step (as decode queries do), so selections overlap."""
        drift = torch.randn(HEADS * GROUP, DIM, generator=self.gen).to(self.device)
        drifted = self.queries[request, layer] + 0.05 * drift
        self.queries[request, layer] = drifted
        return drifted.to(DTYPE)

    def put(self, layer: int, request, position: int, key: torch.Tensor, value: torch.Tensor) -> None:
        block = self.blocks[request][position // BLOCK]
        self.kv[layer][0, block, position % BLOCK] = key
        self.kv[layer][1, block, position % BLOCK] = value

    def step(self, requests: list) -> tuple:
        """One decode token for ``requests`` in both modes; asserts equal outputs and selections; returns the two
        plans (on-device, offload). On-device GSA's block table is ``table_width`` wide when set (as vLLM's is),
        else as wide as the longest request."""
        for request in requests:
            if self.lens[request] % BLOCK == 0:
                self.blocks[request].append(self.physical.pop())
            self.lens[request] += 1
        width = self.table_width or max(len(self.blocks[r]) for r in requests)
        table = torch.tensor([self.blocks[r] + [0] * (width - len(self.blocks[r])) for r in requests],
                             dtype=torch.int32, device=self.device)
        on_device = self.device_gsa.plan(requests, [self.lens[r] for r in requests], table)
        offload = self.offload.plan(requests)
        for layer in range(self.layers):
            q = torch.stack([self.query(r, layer) for r in requests])
            key, value = self.random(len(requests), HEADS, DIM), self.random(len(requests), HEADS, DIM)
            for row, request in enumerate(requests):
                self.put(layer, request, self.lens[request] - 1, key[row], value[row])
            expected = self.device_gsa.run(on_device, layer, q, self.kv[layer][0], self.kv[layer][1], scale=self.scale)
            got = self.offload.run(offload, layer, q, key, value, scale=self.scale)
            assert torch.equal(got, expected), f"layer {layer}: max diff {(got - expected).abs().max()}"
            assert torch.equal(offload.selections[layer].sel_idx, on_device.selections[layer].sel_idx)
        return on_device, offload


@pytest.fixture
def make_twin():
    """Twin factory; the twins' host KV is released at teardown."""
    made = []

    def make(config: GSAConfig, prompts: dict, backend: str = "torch", device: str = "cpu",
             scale: float | None = None, table_width: int | None = None, layers: int = LAYERS) -> Twin:
        made.append(Twin(config, prompts, backend=backend, device=device, scale=scale, table_width=table_width,
                         layers=layers))
        return made[-1]

    yield make
    for twin in made:
        twin.offload.close()


@pytest.mark.parametrize("repr_dtype", ["cache", "fp8"])
def test_offload_returns_exactly_what_on_device_returns(make_twin, repr_dtype):
    twin = make_twin(GSAConfig(**SPARSE, gpu_budget_blocks=200, prefetch_ahead=2, repr_dtype=repr_dtype),
                     {"a": 300, "b": 129, "c": 40})
    for step in range(40):  # blocks fill and open; "c" goes from dense to sparse; "b" joins late
        twin.step(["a", "c"] if step < 5 else ["a", "b", "c"])
    stats = twin.offload.stats
    assert stats.steps == 40 and stats.tokens == 2 * 5 + 3 * 35
    assert stats.needed > 0 and 0.0 < stats.hit_rate < 1.0
    assert stats.d2h_bytes == stats.piece_bytes * HEADS * LAYERS * sum(  # each block the decode filled, once
        (n + 40 - (5 if r == "b" else 0)) // BLOCK - n // BLOCK for r, n in {"a": 300, "b": 129, "c": 40}.items())


def test_dense_first_layers_attend_every_block_offloaded_as_on_device(make_twin):
    twin = make_twin(GSAConfig(**SPARSE, gpu_budget_blocks=200, dense_first_layers=1), {"a": 300, "b": 129})
    for _ in range(6):
        twin.step(["a", "b"])  # asserts equal outputs and selections, layer by layer
    assert set(twin.device_gsa._reprs) == {1}  # layer 0 attended every block: no summaries kept for it
    assert twin.offload.stats.needed > 0


@pytest.mark.parametrize("repr_dtype,score", [("cache", "quest"), ("fp8", "quest"), ("cache", "gauss")])
def test_offload_equals_on_device_on_the_triton_kernels_too(make_twin, repr_dtype, score):
    """The same check through the Triton kernels (compiled on a GPU, the interpreter on a CPU): the
    per-(request, KV head) table over the pool runs the same programs as the paged cache; "b" and then "a" fill a
    block (representation from the pool, fp8 summaries with their scales too; the gauss rule's per-query-head
    rows too, at a scale other than the default: the one both modes attend with)."""
    config = GSAConfig(**SPARSE, gpu_budget_blocks=60, prefetch_ahead=0, repr_dtype=repr_dtype, score=score)
    twin = make_twin(config, {"a": 206, "b": 79}, backend="triton", device=TRITON_DEVICE,
                     scale=0.5 if score == "gauss" else None)
    twin.step(["a", "b"])
    twin.step(["a", "b"])
    assert twin.offload.stats.d2h_bytes == 2 * LAYERS * HEADS * twin.offload.stats.piece_bytes


def test_synchronous_misses_are_counted_and_correct(make_twin):
    """First step after the prompts: nothing is resident, so every selected piece is a synchronous miss."""
    prompts = {"a": 300, "b": 256}  # "a" ends inside a block (fetched to append), "b" on a boundary (new block)
    twin = make_twin(GSAConfig(**SPARSE, gpu_budget_blocks=100, prefetch_ahead=0), prompts)
    twin.step(["a", "b"])
    stats = twin.offload.stats
    tails = LAYERS * HEADS * len(prompts)
    assert stats.needed == LAYERS * HEADS * (6 + 6)  # ceil(0.3 * 19) and ceil(0.3 * 17) blocks
    assert stats.sync_misses == stats.needed - tails + LAYERS * HEADS  # + the tail of "a" fetched before writing
    assert stats.h2d_bytes == stats.sync_misses * stats.piece_bytes
    first = stats.sync_misses
    twin.step(["a", "b"])  # the windows and whatever the new (random) queries select again are hits now
    stats = twin.offload.stats
    assert stats.needed == 2 * LAYERS * HEADS * 12 and 0 < stats.sync_misses - first < LAYERS * HEADS * 12 / 2


@pytest.mark.parametrize("ahead,cap", [(0, 128), (2, 128), (2, 1)])
def test_alternating_batches_prefetch_what_the_last_selection_predicts(ahead, cap, make_twin):
    """Two groups take turns on a budget that holds one group's selection: the other group's pieces get
    evicted; with prefetch they come back before attention (for at most ``cap`` requests a step, the default
    128 covering both), without it they are synchronous misses."""
    config = GSAConfig(**SPARSE, gpu_budget_blocks=24, prefetch_ahead=ahead, prefetch_workers=3,
                       max_pending_prefetch=cap)
    twin = make_twin(config, {"a1": 400, "a2": 390, "b1": 410, "b2": 385})
    misses, prefetched = [], []
    for step in range(8):
        before = twin.offload.stats
        twin.step(["a1", "a2"] if step % 2 == 0 else ["b1", "b2"])
        after = twin.offload.stats
        misses.append(after.sync_misses - before.sync_misses)
        prefetched.append(after.prefetched - before.prefetched)
    cold = sum(misses[:2]) / 2  # nothing resident yet: every selected piece misses
    if not ahead:
        assert sum(prefetched) == 0
        assert min(misses[2:]) > 0.4 * cold  # the other group evicted the top-scoring pieces
    elif cap > 1:  # both requests of the group prefetched (2 requests x 8 blocks)
        assert prefetched[:2] == [0, 0] and min(prefetched[2:]) > 0.4 * cold  # from each group's first return on
        assert max(misses[2:]) < 0.25 * cold  # what is left is the drift of the selection
    else:  # one request of the two: at most its 8 blocks a layer, the other one's evicted pieces miss
        assert all(0 < count <= LAYERS * HEADS * 8 for count in prefetched[2:])
        assert min(misses[2:]) > 0.3 * cold


def test_a_steady_batch_prefetches_nothing(make_twin):
    """Requests that ran last step have their last selection resident: no prefetch work for them."""
    twin = make_twin(GSAConfig(**SPARSE, gpu_budget_blocks=200, prefetch_ahead=2), {"a": 300, "b": 200})
    for _ in range(5):
        twin.step(["a", "b"])
    assert twin.offload.stats.prefetched == 0 and twin.offload.stats.needed > 0


def test_budget_smaller_than_a_step_is_a_clear_error(make_twin):
    twin = make_twin(GSAConfig(**SPARSE, gpu_budget_blocks=4, prefetch_ahead=0), {"a": 500})
    with pytest.raises(ValueError, match="gpu_budget_blocks=4"):
        twin.step(["a"])


def test_gpu_budget_in_bytes_is_shared_by_the_layers(make_twin):
    piece_bytes = 2 * BLOCK * DIM * DTYPE.itemsize
    twin = make_twin(GSAConfig(**SPARSE, gpu_budget_bytes=LAYERS * 50 * piece_bytes + 7), {"a": 300})
    assert twin.offload.capacity == 50 and all(pool.capacity == 50 for pool in twin.offload.pools)
    twin.step(["a"])
    small = make_twin(GSAConfig(**SPARSE, gpu_budget_bytes=LAYERS * 9 * piece_bytes), {"a": 300})
    with pytest.raises(ValueError, match=f"gpu_budget_bytes={LAYERS * 9 * piece_bytes}: this step needs up to 14 "):
        small.step(["a"])  # 2 heads x (6 selected + 1 newest block)
    with pytest.raises(ValueError, match="gpu_budget_bytes: got 100, less than one piece"):
        OffloadedGSA(GSAConfig(**SPARSE, gpu_budget_bytes=100), num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM,
                     block_size=BLOCK, host_blocks=8, device="cpu", cache=private_cache())


@pytest.mark.parametrize("backend,device,drift", [("torch", "cpu", None), ("triton", TRITON_DEVICE, None),
                                                  ("torch", "cpu", 0.002), ("triton", TRITON_DEVICE, 0.002)])
def test_selection_reuse_offloaded_equals_on_device(make_twin, backend, device, drift):
    """select_every 4: the offload mode keeps each request's lists as on-device GSA does (same rows reselect: a
    new block, an old selection, a request back after a step away), so outputs and lists stay bit-equal; most
    rows reuse. With the drift rule (the twins' queries move about 0.00125 of drift a step) layers also reselect
    the rows whose queries moved (a third of the layer rows the step rule keeps, in a scratch count), the same in
    both modes."""
    config = GSAConfig(**SPARSE, gpu_budget_blocks=200, prefetch_ahead=2, select_every=4, select_drift=drift)
    twin = make_twin(config, {"a": 300, "b": 129, "c": 200}, backend=backend, device=device, table_width=64)
    rows = reselected = 0
    for step in range(12 if backend == "triton" else 24):
        batch = ["a", "b"] if step % 5 == 4 else ["a", "b", "c"]  # "c" sits out some steps
        on_device, offload = twin.step(batch)
        assert offload.reuse.reselect == on_device.reuse.reselect
        rows, reselected = rows + len(batch), reselected + sum(offload.reuse.reselect)
    assert 0 < reselected < rows / 2
    twin.offload.finish("c")
    twin.device_gsa.finish("c")
    twin.step(["a", "b"])


def test_two_stages_are_refused_in_offload_mode_naming_the_key():
    with pytest.raises(ValueError, match="rerank_candidates: got 2.0"):
        OffloadedGSA(GSAConfig(**SPARSE, rerank_candidates=2.0), num_layers=LAYERS, num_kv_heads=HEADS, head_dim=32,
                     block_size=16, host_blocks=8, device="cpu", cache=private_cache())


def test_host_kv_lives_in_the_cache_tier_and_finish_frees_everything():
    cache = private_cache()
    gsa = OffloadedGSA(GSAConfig(**SPARSE, gpu_budget_blocks=50), num_layers=LAYERS, num_kv_heads=HEADS,
                       head_dim=DIM, block_size=BLOCK, host_blocks=40, dtype=DTYPE, device="cpu", cache=cache)
    host_bytes = LAYERS * 40 * HEADS * 2 * BLOCK * DIM * DTYPE.itemsize
    assert len(cache) == LAYERS and cache.pool.get_stats()["currently_used"] >= host_bytes
    for layer in range(LAYERS):
        gsa.write_prompt("r", layer, torch.randn(100, HEADS, DIM).to(DTYPE), torch.randn(100, HEADS, DIM).to(DTYPE))
    plan = gsa.plan(["r"])
    for layer in range(LAYERS):
        gsa.run(plan, layer, torch.randn(1, HEADS * GROUP, DIM).to(DTYPE), torch.randn(1, HEADS, DIM).to(DTYPE),
                torch.randn(1, HEADS, DIM).to(DTYPE))
    assert all(int((pool.slot_of >= 0).sum()) > 0 for pool in gsa.pools)
    gsa.finish("r")
    assert all(int((pool.slot_of >= 0).sum()) == 0 and not pool.pinned.any() for pool in gsa.pools)
    assert gsa.host.free_blocks == 40
    with pytest.raises(ValueError, match="write_prompt"):
        gsa.plan(["r"])
    pool_kv = weakref.ref(gsa.pools[0].kv)
    gsa.close()
    assert len(cache) == 0 and cache.pool.get_stats()["currently_used"] == 0
    assert pool_kv() is None  # the device pools are freed with the host KV
    gsa.close()  # closing again does nothing
    keys = torch.randn(100, HEADS, DIM).to(DTYPE)
    for call in (lambda: gsa.plan(["r"]), lambda: gsa.write_prompt("s", 0, keys, keys), lambda: gsa.finish("r"),
                 lambda: gsa.run(plan, 0, keys[:1].repeat(1, GROUP, 1), keys[:1], keys[:1]), lambda: gsa.capacity):
        with pytest.raises(RuntimeError, match="OffloadedGSA: closed"):
            call()


@pytest.mark.parametrize("name,value", [("num_layers", 0), ("num_kv_heads", -2), ("head_dim", 32.0),
                                        ("block_size", True), ("host_blocks", 0)])
def test_bad_kv_geometry_is_refused_naming_the_argument(name, value):
    sizes = {**dict(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, block_size=BLOCK, host_blocks=8), name: value}
    with pytest.raises(ValueError, match=f"{name}: got {value!r}, expected a positive int"):
        OffloadedGSA(GSAConfig(**SPARSE), **sizes, device="cpu", cache=private_cache())


def test_a_plan_reuses_the_last_block_table_only_while_the_batch_rows_are_the_same():
    """The device table of a plan whose requests (in order) have the blocks of the last plan's is that plan's; a
    block opening, another batch or order, and a request finished and written again under its id make a new one."""
    gsa = OffloadedGSA(GSAConfig(**SPARSE, gpu_budget_blocks=50), num_layers=LAYERS, num_kv_heads=HEADS,
                       head_dim=DIM, block_size=BLOCK, host_blocks=40, dtype=DTYPE, device="cpu",
                       cache=private_cache())

    def write(request, tokens):
        for layer in range(LAYERS):
            gsa.write_prompt(request, layer, torch.randn(tokens, HEADS, DIM).to(DTYPE),
                             torch.randn(tokens, HEADS, DIM).to(DTYPE))

    def step(requests):
        plan = gsa.plan(requests)
        width = max(len(gsa.requests[r].blocks) for r in requests)
        expected = [gsa.requests[r].blocks + [0] * (width - len(gsa.requests[r].blocks)) for r in requests]
        assert plan.block_table.tolist() == expected
        for layer in range(LAYERS):
            gsa.run(plan, layer, torch.randn(len(requests), HEADS * GROUP, DIM).to(DTYPE),
                    torch.randn(len(requests), HEADS, DIM).to(DTYPE), torch.randn(len(requests), HEADS, DIM).to(DTYPE))
        return plan.block_table

    write("a", 46)
    write("b", 20)
    first = step(["a", "b"])  # a: 47 tokens, b: 21
    assert step(["a", "b"]) is first  # a: 48 tokens, its third block full; b: 22
    opened = step(["a", "b"])  # a's 49th token opens a fourth block
    assert len(gsa.requests["a"].blocks) == 4 and opened is not first
    assert step(["a", "b"]) is opened
    reordered = step(["b", "a"])
    assert reordered is not opened and step(["b", "a"]) is reordered
    gsa.finish("a")
    write("a", 46)  # the same id and length, other blocks
    assert step(["b", "a"]) is not reordered
    gsa.close()


@pytest.mark.parametrize("select_every", [1, 3])
def test_a_decode_whose_tables_widen_compiles_nothing_new(make_twin, select_every):
    """Both modes on the Triton kernels, two requests: after 5 warm-up steps (every kind of step: a request joining,
    no row and some rows reselecting; a block opening, one filling, neither) the longer request opens its 49th block,
    so the block table's width goes from 48 to 49 blocks and the selection's from 16 to 17 list entries (each
    crossing a multiple of 16, where an int or a stride argument would change Triton specialisation). No kernel is
    launched in a specialisation it was not launched in before: on a GPU each would be a compile in the middle of
    decoding."""
    config = GSAConfig(**{**SPARSE, "sparse_ratio": 1 / 3}, gpu_budget_blocks=200, select_every=select_every)
    sizes = ops.select_sizes(config, BLOCK)
    assert selection_width(48, **sizes) == 16 and selection_width(49, **sizes) == 17  # the crossings happen
    twin = make_twin(config, {"a": 48 * BLOCK - 5, "b": 20 * BLOCK - 3}, backend="triton", device=TRITON_DEVICE,
                     table_width=64, layers=1)
    for step in range(5):
        twin.step(["a", "b"] if step else ["a"])
    seen = {launcher: set(launcher.specialisations) for launcher in LAUNCHERS}
    for _ in range(3):
        twin.step(["a", "b"])
    assert -(-twin.lens["a"] // BLOCK) == 49
    new = {launcher.kernel.fn.__name__: launcher.specialisations - seen.get(launcher, set()) for launcher in LAUNCHERS}
    assert not {name: keys for name, keys in new.items() if keys}
