"""kv_transfer gather/scatter (the kernel and the torch twin) against the loop reference, bit for bit: compiled on
a GPU (CUDA tensors), the Triton interpreter on a CPU. (CPU tensors on a GPU machine take the library's torch
path, not the kernel.)"""
import pytest
import torch

from ucm_kernels.kv_transfer import (detect_layout, gather_blocks, gather_blocks_into_rows, scatter_blocks,
                                  scatter_blocks_from_rows, torch_gather_blocks, torch_scatter_blocks)
from ucm_kernels.kv_transfer.naive import naive_gather_blocks, naive_scatter_blocks

NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 2, 7, 4, 2, 8
KINDS = ["flash_attn", "flashinfer", "mla", "cpu_packed"]
DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float32]
# Ragged batches with -1 padding in the middle and at the end, a repeated id (gather only), a full batch.
GATHER_IDS = [[3, -1, 0, 6, -1], [5, 2, 2, 0], list(range(NUM_BLOCKS))]
SCATTER_IDS = [[3, -1, 0, 6, -1], [1, 4], [-1, -1]]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ids_tensor(ids, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(ids, dtype=dtype, device=DEVICE)


def layer_shape(kind: str) -> tuple[int, ...]:
    return {"flash_attn": (2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM),
            "flashinfer": (NUM_BLOCKS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM),
            "mla": (NUM_BLOCKS, BLOCK_SIZE, 3 * HEAD_DIM),
            "cpu_packed": (NUM_BLOCKS, KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)}[kind]


def random_layers(kind: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(layer_shape(kind), generator=gen).to(DEVICE, dtype) for _ in range(NUM_LAYERS)]


def as_bytes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Byte copies, so NaN payloads compare exactly with torch.equal."""
    return [t.view(torch.uint8).clone() for t in tensors]


def poisoned_staging(n_ids: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    layout = detect_layout(random_layers(kind, dtype), kind)
    return torch.full(layout.staging_shape(n_ids), 0xFF, dtype=torch.uint8, device=DEVICE)  # NaN in every float dtype


@pytest.mark.parametrize("ids", GATHER_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_gather_matches_reference(kind, dtype, ids):
    layers = random_layers(kind, dtype)
    before = as_bytes(layers)
    block_ids = ids_tensor(ids, torch.int32 if len(ids) % 2 else torch.int64)
    out = poisoned_staging(len(ids), kind, dtype)
    expected = naive_gather_blocks(layers, block_ids, out.clone(), detect_layout(layers, kind))

    result = gather_blocks(layers, block_ids, out=out)

    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)
    assert all((out[i] == 0xFF).all() for i, block in enumerate(ids) if block < 0)
    assert all(torch.equal(a, b) for a, b in zip(as_bytes(layers), before))


@pytest.mark.parametrize("ids", SCATTER_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_scatter_matches_reference(kind, dtype, ids):
    layers = random_layers(kind, dtype)
    block_ids = ids_tensor(ids, torch.int64 if len(ids) % 2 else torch.int32)
    targets = ids_tensor([b for b in ids if b >= 0])
    layout = detect_layout(layers, kind)
    naive_scatter_blocks(poisoned_staging(len(targets), kind, dtype), targets, layers, layout)  # NaN-poison targets
    staging = gather_blocks(random_layers(kind, dtype, seed=1), block_ids.clamp(min=0))
    staging_before = staging.clone()
    expected = [t.clone() for t in layers]
    naive_scatter_blocks(staging, block_ids, expected, layout)
    untouched = [b for b in range(NUM_BLOCKS) if b not in ids]
    untouched_before = gather_blocks(layers, ids_tensor(untouched))

    scatter_blocks(staging, block_ids, layers)

    assert all(torch.equal(a, b) for a, b in zip(as_bytes(layers), as_bytes(expected)))
    assert torch.equal(gather_blocks(layers, ids_tensor(untouched)), untouched_before)
    assert torch.equal(staging, staging_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_twin_equals_the_loop_reference(kind, dtype):
    layers, targets = random_layers(kind, dtype), random_layers(kind, dtype, seed=1)
    layout = detect_layout(layers, kind)
    for ids in GATHER_IDS:
        block_ids = ids_tensor(ids)
        want = naive_gather_blocks(layers, block_ids, poisoned_staging(len(ids), kind, dtype), layout)
        got = torch_gather_blocks(layers, block_ids, poisoned_staging(len(ids), kind, dtype), layout)
        assert torch.equal(got, want)
    for ids in SCATTER_IDS:
        block_ids, staging = ids_tensor(ids), poisoned_staging(len(ids), kind, dtype)
        staging.copy_(torch.randint(0, 255, staging.shape, dtype=torch.uint8, device=DEVICE))
        want, got = [t.clone() for t in targets], [t.clone() for t in targets]
        naive_scatter_blocks(staging, block_ids, want, layout)
        torch_scatter_blocks(staging, block_ids, got, layout)
        assert all(torch.equal(a, b) for a, b in zip(as_bytes(got), as_bytes(want)))


def test_round_trip_moves_blocks_between_caches():
    source, target = random_layers("flash_attn", torch.bfloat16), random_layers("flash_attn", torch.bfloat16, 1)
    staging = gather_blocks(source, ids_tensor([6, 1, 3]))
    scatter_blocks(staging, ids_tensor([0, 4, 5]), target)
    for src_block, dst_block in ((6, 0), (1, 4), (3, 5)):
        for src, dst in zip(source, target):
            assert torch.equal(src[:, src_block].view(torch.uint8), dst[:, dst_block].view(torch.uint8))


def test_narrow_words_for_unaligned_caches():
    """30-byte fp16 blocks at an odd element offset are only 2-byte aligned: 2-byte words, still exact."""
    backing = torch.randn(NUM_LAYERS, 1 + NUM_BLOCKS * 3 * 5).to(DEVICE, torch.float16)
    layers = [backing[i, 1:].view(NUM_BLOCKS, 3, 5) for i in range(NUM_LAYERS)]  # 30-byte blocks, 2-byte aligned
    block_ids = ids_tensor([4, -1, 0])
    out = torch.full((3, NUM_LAYERS, 1, 30), 0xFF, dtype=torch.uint8, device=DEVICE)
    expected = naive_gather_blocks(layers, block_ids, out.clone(), detect_layout(layers, "mla"))
    assert torch.equal(gather_blocks(layers, block_ids, out=out), expected)

    staging = torch.randint(0, 256, (3, NUM_LAYERS, 1, 30), dtype=torch.uint8, device=DEVICE)
    expected_layers = [t.clone() for t in layers]
    naive_scatter_blocks(staging, block_ids, expected_layers, detect_layout(layers, "mla"))
    scatter_blocks(staging, block_ids, layers)
    assert all(torch.equal(a, b) for a, b in zip(as_bytes(layers), as_bytes(expected_layers)))


def test_flash_attn_with_blocks_outermost_strides():
    """vLLM may allocate (num_blocks, 2, ...) and hand out the (2, num_blocks, ...) transposed view: K and V of a
    block are then one 256-byte run."""
    physical = [torch.randn(NUM_BLOCKS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(DEVICE, torch.bfloat16)
                for _ in range(2)]
    layers = [p.transpose(0, 1) for p in physical]
    layout = detect_layout(layers)
    assert (layout.kind, layout.num_segments, layout.segment_bytes) == ("flash_attn", 1, 256)
    block_ids = ids_tensor([2, 5, -1])
    expected = naive_gather_blocks(layers, block_ids, poisoned_staging(3, "flash_attn", torch.bfloat16), layout)
    gathered = gather_blocks(layers, block_ids, out=poisoned_staging(3, "flash_attn", torch.bfloat16))
    assert torch.equal(gathered.flatten(), expected.flatten())


def test_detect_layout_describes_llama_block():
    layers = [torch.empty(2, 10, 16, 8, 128, dtype=torch.bfloat16) for _ in range(3)]
    layout = detect_layout(layers)
    assert (layout.kind, layout.num_layers, layout.num_blocks, layout.num_segments) == ("flash_attn", 3, 10, 2)
    assert (layout.segment_bytes, layout.block_stride_bytes, layout.row_bytes) == (32768, 32768, 3 * 65536)
    assert layout.segment_stride_bytes == 10 * 32768


@pytest.mark.parametrize("layers, kind, message", [
    ([], None, "empty"),
    ([torch.empty(2, 2, 4, 2, 8)], None, "unambiguously"),
    ([torch.empty(3, 7, 4, 2, 8)], "flash_attn", "expects"),
    ([torch.empty(7, 4, 2, 8, 2)], None, "unambiguously"),
    ([torch.empty(7, 4, 8)], "paged", "kind="),
    ([torch.empty(7, 4, 8, dtype=torch.float64)], None, "dtype"),
    ([torch.empty(7, 4, 8), torch.empty(7, 4, 9)], None, "layers\\[1\\]"),
    ([torch.empty(7, 2, 4, 2, 8).transpose(3, 4)], None, "row-major"),
    ([torch.empty(7, 4, 16)[:, :, :8]], None, "row-major"),
    ([torch.empty(4, 8).expand(7, 4, 8)], None, "overlap"),
])
def test_detect_layout_rejects_bad_caches(layers, kind, message):
    with pytest.raises(ValueError, match=message):
        detect_layout(layers, kind)


@pytest.mark.parametrize("block_ids, message", [
    (torch.tensor([0, 7]), "span \\[0, 7\\]"),
    (torch.tensor([-2, 1]), "span \\[-2, 1\\]"),
    (torch.tensor([0.0]), "int32 or int64"),
    (torch.tensor([[0]]), "1-D"),
])
def test_gather_rejects_bad_ids(block_ids, message):
    with pytest.raises(ValueError, match=message):
        gather_blocks(random_layers("mla", torch.float16), block_ids.to(DEVICE))


def test_gather_and_scatter_reject_bad_staging():
    layers = random_layers("mla", torch.float16)
    row_bytes = detect_layout(layers).row_bytes
    with pytest.raises(ValueError, match=f"out: .* expected a contiguous uint8 tensor of {2 * row_bytes} bytes"):
        gather_blocks(layers, ids_tensor([0, 1]), out=torch.empty(2 * row_bytes + 1, dtype=torch.uint8, device=DEVICE))
    with pytest.raises(ValueError, match="staging: torch.float16"):
        scatter_blocks(torch.empty(row_bytes // 2, dtype=torch.float16, device=DEVICE), ids_tensor([0]), layers)


def test_empty_batch_is_a_no_op():
    layers = random_layers("cpu_packed", torch.bfloat16)
    assert gather_blocks(layers, ids_tensor([])).shape == (0, NUM_LAYERS, 1, 256)


def _fa026(nb):  # vLLM 0.26 FlashAttention: view (nb, heads, block, 2*head) of token-major storage
    return torch.randn(nb, BLOCK_SIZE, KV_HEADS, 2 * HEAD_DIM).to(DEVICE, torch.bfloat16).permute(0, 2, 1, 3)


def _flashinfer_hnd(nb):  # FlashInfer HND storage (nb, 2, heads, block, head) seen as (nb, 2, block, heads, head)
    return torch.randn(nb, 2, KV_HEADS, BLOCK_SIZE, HEAD_DIM).to(DEVICE, torch.float16).permute(0, 1, 3, 2, 4)


def _fa_planes(nb):  # classic FlashAttention: K and V planes (2, nb, block, heads, head)
    return torch.randn(2, nb, BLOCK_SIZE, KV_HEADS, HEAD_DIM).to(DEVICE, torch.bfloat16)


def _expected_block_bytes(layer: torch.Tensor, block: int) -> torch.Tensor:
    """The bytes of ``block`` in storage order, by plain indexing: K then V for the plane layout."""
    if layer.shape[0] == 2 and layer.dim() == 5:
        return torch.cat([layer[0, block].contiguous().view(torch.uint8).flatten(),
                          layer[1, block].contiguous().view(torch.uint8).flatten()])
    order = sorted(range(layer.dim() - 1), key=lambda d: -layer[block].stride(d))
    return layer[block].permute(*order).contiguous().view(torch.uint8).flatten()


@pytest.mark.parametrize("make, segments", [(_fa026, 1), (_flashinfer_hnd, 1), (_fa_planes, 2)])
def test_layouts_found_by_num_blocks_move_as_opaque_bytes(make, segments):
    layers, target = [make(NUM_BLOCKS) for _ in range(NUM_LAYERS)], [make(NUM_BLOCKS) for _ in range(NUM_LAYERS)]
    layout = detect_layout(layers, num_blocks=NUM_BLOCKS)
    assert (layout.kind, layout.num_blocks, layout.num_segments) == ("opaque", NUM_BLOCKS, segments)
    ids = ids_tensor([5, -1, 0, 3])
    out = torch.full(layout.staging_shape(4), 0xFF, dtype=torch.uint8, device=DEVICE)

    rows = gather_blocks(layers, ids, out=out, layout=layout)

    for i, block in enumerate(ids.tolist()):
        expected = [_expected_block_bytes(layer, block) for layer in layers] if block >= 0 else None
        assert torch.equal(rows[i].flatten(), torch.cat(expected)) if expected else (rows[i] == 0xFF).all()
    assert torch.equal(naive_gather_blocks(layers, ids, torch.full_like(out, 0xFF), layout), rows)
    before = [_expected_block_bytes(layer, 1) for layer in target]
    scatter_blocks(rows, ids_tensor([2, -1, 4, 6]), target, layout=layout)
    for source_block, target_block in ((5, 2), (0, 4), (3, 6)):
        assert all(torch.equal(_expected_block_bytes(t, target_block), _expected_block_bytes(s, source_block))
                   for s, t in zip(layers, target))
    assert all(torch.equal(_expected_block_bytes(t, 1), b) for t, b in zip(target, before))


def test_vllm_026_flash_attn_view_is_one_64k_run_per_block():
    """The layers vLLM 0.26 hands connectors under FlashAttention: (num_blocks, 8, 16, 256) with strides
    (32768, 256, 2048, 1) (issue 16); a named-kind guess would take them for the CPU packing."""
    layer = torch.empty(3, 16, 8, 256, dtype=torch.bfloat16).permute(0, 2, 1, 3)
    assert layer.stride() == (32768, 256, 2048, 1)
    layout = detect_layout([layer], num_blocks=3)
    assert (layout.num_segments, layout.segment_bytes, layout.block_stride_bytes) == (1, 65536, 65536)
    with pytest.raises(ValueError, match=r"strides \(32768, 256, 2048, 1\)"):
        detect_layout([layer])


@pytest.mark.parametrize("layer, num_blocks, message", [
    (torch.empty(4, 4, 8), 4, r"dims \[0, 1\] of num_blocks=4"),
    (torch.empty(5, 4, 8), 7, "no dim of num_blocks=7"),
    (torch.empty(7, 4, 16)[:, :, :8], 7, r"shape \(7, 4, 8\), strides \(64, 16, 1\): no dim"),
    (torch.empty(2, 4, 7, 8).permute(2, 0, 1, 3), 7, r"strides \(8, 224, 56, 1\): no dim"),
])
def test_num_blocks_detection_refuses_what_it_cannot_move(layer, num_blocks, message):
    with pytest.raises(ValueError, match=message):
        detect_layout([layer], num_blocks=num_blocks)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_as_separate_buffers_move_like_contiguous_staging(kind):
    """Rows anywhere (e.g. one pool buffer per block): the kernel reads a table of their addresses."""
    layers, target = random_layers(kind, torch.float16), random_layers(kind, torch.float16, seed=1)
    layout = detect_layout(layers, kind)
    ids = ids_tensor([4, 0, 6])
    rows = [torch.full((layout.row_bytes,), 0xFF, dtype=torch.uint8, device=DEVICE) for _ in range(3)]
    gather_blocks_into_rows(layers, ids, rows, layout=layout)
    assert torch.equal(torch.stack(rows), gather_blocks(layers, ids).view(3, -1))
    expected = [t.clone() for t in target]
    scatter_blocks(torch.stack(rows), ids_tensor([1, 2, 5]), expected)
    scatter_blocks_from_rows(rows, ids_tensor([1, 2, 5]), target, layout=layout)
    assert all(torch.equal(a, b) for a, b in zip(as_bytes(target), as_bytes(expected)))
    with pytest.raises(ValueError, match="2 rows for 3 block ids"):
        gather_blocks_into_rows(layers, ids, rows[:2], layout=layout)
    arena = torch.empty(3 * layout.row_bytes, dtype=torch.uint8, device=DEVICE)  # one storage, the second row short
    short = [arena[:layout.row_bytes], arena[layout.row_bytes:2 * layout.row_bytes - 1], arena[-layout.row_bytes:]]
    with pytest.raises(ValueError, match=r"rows\[1\]: .* expected a contiguous uint8 tensor"):
        gather_blocks_into_rows(layers, ids, short, layout=layout)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_tensors_without_the_interpreter_take_the_torch_copy(kind, monkeypatch):
    """A process without TRITON_INTERPRET (a user's CPU machine: importing the packages does not set it) moves CPU
    blocks by torch indexing: the same bytes as the kernel path, to contiguous staging and to separate rows."""
    layers, target = random_layers(kind, torch.bfloat16), random_layers(kind, torch.bfloat16, seed=1)
    layout = detect_layout(layers, kind)
    ids, to = torch.tensor([4, -1, 0, 6]), torch.tensor([1, -1, 2, 5])
    cpu = [t.cpu() for t in layers]
    expected_rows = gather_blocks(cpu, ids, layout=layout)
    expected = [t.cpu() for t in target]
    scatter_blocks(expected_rows, to, expected, layout=layout)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = gather_blocks(cpu, ids, out=torch.full_like(expected_rows, 0xFF), layout=layout)
    assert torch.equal(rows[ids >= 0], expected_rows[ids >= 0]) and (rows[1] == 0xFF).all()  # the -1 row untouched
    separate = [torch.full((layout.row_bytes,), 0xFF, dtype=torch.uint8) for _ in range(3)]
    gather_blocks_into_rows(cpu, ids[ids >= 0], separate, layout=layout)
    assert torch.equal(torch.stack(separate), rows[ids >= 0].view(3, -1))
    moved = [t.cpu() for t in target]
    scatter_blocks(rows, to, moved, layout=layout)
    assert all(torch.equal(a, b) for a, b in zip(as_bytes(moved), as_bytes(expected)))
