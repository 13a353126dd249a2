"""Host-to-device staging: exact bytes, dtypes and shapes, inputs left alone, buffers reused only after their copy."""
import pytest
import torch

from ucm_kernels.staging import HostStaging, host_to_device

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def mixed_batch(seed: int) -> list[torch.Tensor]:
    """Tensors of every dtype a plan moves, odd sizes (so packing must align), an empty one and a 2-D one."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(-2**40, 2**40, (7,), generator=gen),
            torch.randint(-2**30, 2**30, (3, 5), generator=gen, dtype=torch.int32),
            torch.rand(13, generator=gen) > 0.5,
            torch.empty(0, dtype=torch.int64),
            torch.randn(9, generator=gen).to(torch.bfloat16),
            torch.tensor([11], dtype=torch.int32)]


@pytest.mark.parametrize("device", DEVICES)
def test_upload_gives_each_tensor_exactly_with_its_dtype_and_shape(device):
    host = mixed_batch(0)
    before = [t.clone() for t in host]
    moved = HostStaging(device).upload(*host)
    assert len(moved) == len(host)
    for got, want in zip(moved, before):
        assert got.device.type == device and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want)
    assert all(torch.equal(t, b) for t, b in zip(host, before))


@pytest.mark.parametrize("device", DEVICES)
def test_uploads_in_turn_keep_earlier_results_intact(device):
    """Buffers are reused every other batch and grow when a batch is larger: no earlier result may change."""
    staging = HostStaging(device)
    batches = [mixed_batch(seed) + [torch.arange(seed * 1000, dtype=torch.int64)] for seed in range(6)]
    moved = [staging.upload(*batch) for batch in batches]
    for batch, got in zip(batches, moved):
        for tensor, landed in zip(batch, got):
            assert torch.equal(landed.cpu(), tensor)


def test_upload_names_a_tensor_that_is_not_on_the_cpu():
    with pytest.raises(ValueError, match=r"tensors\[1\]: on meta, expected a CPU tensor"):
        HostStaging("cpu").upload(torch.zeros(2), torch.zeros(2, device="meta"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_host_to_device_copies_exactly_and_leaves_the_host_tensor_alone(device, dtype):
    host = (torch.arange(-3, 4000) % 7 > 2) if dtype == torch.bool else torch.arange(-3, 4000, dtype=dtype) * 977
    before = host.clone()
    moved = host_to_device(host, device)
    assert moved.device.type == device and moved.dtype == dtype and torch.equal(moved.cpu(), before)
    assert torch.equal(host, before) and not host.is_pinned()
