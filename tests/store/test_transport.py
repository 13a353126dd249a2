"""CUDATransport: pinned-buffer API, copies, block offload/load; on CPU (interpreter) and, where there is one,
on a GPU (real streams, pinned memory, compiled kernels)."""
import pytest
import torch

from ucm_kernels.kv_transfer import detect_layout
from ucm_kernels.kv_transfer.naive import naive_gather_blocks, naive_scatter_blocks
from ucm_store.pool import PinnedMemoryPool
from ucm_store.transport import CUDATransport, _pieces

POOL_BYTES = 64 << 10
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def transport():
    pool = PinnedMemoryPool(pinned_pool_size=POOL_BYTES, max_pinned_size=2 * POOL_BYTES,
                            pinned=torch.cuda.is_available())
    return CUDATransport(device_id=0, pool=pool)


def random_cache(shape, seed, num_layers=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE) for _ in range(num_layers)]


def test_pinned_buffers_come_from_the_pool_and_go_back(transport):
    buf = transport.get_pinned_buffer(10_000)
    assert (buf.dtype, buf.shape, buf.data_ptr() % 4096) == (torch.uint8, (10_000,), 0)
    assert transport._pool.get_stats()["currently_used"] == 12288
    transport.release_pinned_buffer(buf)
    assert transport._pool.get_stats()["currently_used"] == 0


def test_buffer_larger_than_the_pool_gets_a_dedicated_allocation(transport):
    size = 3 * POOL_BYTES + 5
    buf = transport.get_pinned_buffer(size)
    assert (buf.dtype, buf.shape, buf.data_ptr() % 4096) == (torch.uint8, (size,), 0)
    assert transport._pool.get_stats()["currently_used"] == 0
    transport.release_pinned_buffer(buf)
    with pytest.raises(ValueError, match="not a live buffer"):
        transport.release_pinned_buffer(buf)


def test_get_pinned_buffer_rejects_bad_sizes(transport):
    with pytest.raises(ValueError, match="size=0"):
        transport.get_pinned_buffer(0)


def test_h2d_and_d2h_copy_and_complete(transport):
    host = transport.get_pinned_buffer(4096)
    host.copy_(torch.randint(0, 256, (4096,), dtype=torch.uint8))
    device = torch.full((4096,), 7, dtype=torch.uint8, device=DEVICE)
    task = transport.h2d(host, device)
    transport.synchronize(task)
    assert task.done() and torch.equal(device.cpu(), host)

    as_floats = torch.randn(1024, device=DEVICE)
    task = transport.d2h(as_floats, host)  # different dtypes, same byte count: copied as bytes
    transport.synchronize(task)
    assert torch.equal(host.view(torch.float32), as_floats.cpu())
    transport.release_pinned_buffer(host)


def test_copies_follow_the_callers_queued_work_across_recycled_events(transport):
    """Each copy sees what the caller's stream queued before it (on a GPU the caller is kept busy, so the copy
    must wait for it), and copies outstanding at once complete independently, rounds after round reusing the
    completion events that synchronize() recycles."""
    nbytes = 16 << 10
    host_in, host_out = transport.get_pinned_buffer(nbytes), transport.get_pinned_buffer(nbytes)
    busy = torch.randn(512, 512, device=DEVICE)
    for round_ in range(1, 5):
        source, target = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE), torch.empty_like(host_in, device=DEVICE)
        for _ in range(20):  # queue work on the caller's stream ahead of the write the copy must see
            busy = busy @ busy / busy.norm()
        source.fill_(round_)
        host_in.fill_(100 + round_)
        tasks = [transport.d2h(source, host_out), transport.h2d(host_in, target)]
        for task in tasks:
            transport.synchronize(task)
            assert task.event is None and task.done()
        assert torch.equal(host_out, torch.full_like(host_out, round_))
        assert torch.equal(target.cpu(), torch.full_like(host_in, 100 + round_))
    transport.release_pinned_buffer(host_in)
    transport.release_pinned_buffer(host_out)


def test_use_cuda_false_moves_cpu_tensors_on_any_machine():
    transport = CUDATransport(device_id=0, use_cuda=False)
    src, dst = torch.arange(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)
    transport.synchronize(transport.h2d(src, dst))
    assert transport.device.type == "cpu" and torch.equal(dst, src)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_cuda=True: CUDA is not available"):
            CUDATransport(device_id=0, use_cuda=True)


def test_copies_reject_mismatched_sizes(transport):
    with pytest.raises(ValueError, match="equal byte size"):
        transport.h2d(torch.empty(16, dtype=torch.uint8), torch.empty(17, dtype=torch.uint8, device=DEVICE))


@pytest.mark.parametrize("shape", [(2, 6, 4, 2, 8), (6, 2, 4, 16)])
@pytest.mark.parametrize("strategy", ["auto", "direct", "staged"])
def test_offload_then_load_moves_blocks_exactly(transport, shape, strategy):
    source, target = random_cache(shape, 0), random_cache(shape, 1)
    layout = detect_layout(source)
    offloaded, loaded = [4, -1, 0, 5], torch.tensor([1, 3, -1, 2], dtype=torch.int32)
    nbytes = len(offloaded) * layout.row_bytes
    rows = transport.get_pinned_buffer(nbytes + 100)
    rows.fill_(0xFF)  # NaN in bf16; the row of the -1 id and the tail must stay so
    expected_rows = naive_gather_blocks(source, torch.tensor(offloaded, device=DEVICE), rows[:nbytes].clone().to(
        DEVICE).view(layout.staging_shape(len(offloaded))), layout).view(-1).cpu()
    source_before = [t.clone() for t in source]

    transport.synchronize(transport.offload_blocks(source, offloaded, rows, strategy=strategy))

    assert torch.equal(rows[:nbytes], expected_rows) and (rows[nbytes:] == 0xFF).all()
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(source, source_before))
    expected_target = [t.clone() for t in target]
    naive_scatter_blocks(rows[:nbytes].to(DEVICE).view(layout.staging_shape(len(offloaded))), loaded.to(DEVICE),
                         expected_target, layout)
    rows_before = rows.clone()

    transport.synchronize(transport.load_blocks(rows, loaded, target, strategy=strategy))

    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(target, expected_target))
    assert torch.equal(rows, rows_before)
    transport.release_pinned_buffer(rows)


def test_block_moves_reject_bad_arguments(transport):
    cache = random_cache((6, 2, 4, 16), 0)
    small = transport.get_pinned_buffer(10)
    with pytest.raises(ValueError, match="pinned_dst: .* at least 1536 bytes"):
        transport.offload_blocks(cache, [0, 1], small)
    with pytest.raises(ValueError, match="strategy='fast'"):
        transport.load_blocks(small, [0], cache, strategy="fast")
    with pytest.raises(ValueError, match="block_ids: values span \\[0, 6\\]"):
        transport.offload_blocks(cache, [0, 6], transport.get_pinned_buffer(1536))


def test_pieces_cover_valid_runs_in_bounded_chunks():
    ids = torch.tensor([-1, 0, 1, 2, -1, 3, -1, -1, 4])
    assert _pieces(ids, 2) == [(1, 3), (3, 4), (5, 6), (8, 9)]
    assert _pieces(torch.tensor([-1, -1]), 4) == []
    assert _pieces(torch.arange(5), 8) == [(0, 5)]
