"""block_repr kernel and torch twin vs the loop reference; fp8 reprs rounded outward; incremental updates;
blocks_filled vs a plain loop."""
import pytest
import torch

from ucm_kernels.block_repr import (blocks_filled, empty_block_repr, naive_update_block_repr, torch_update_block_repr,
                                   update_block_repr, update_block_repr_ranges)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
# kmean tolerance per repr dtype: kernel and reference sum in a different order, then round once. fp8 kmean is
# compared as stored (before its scale): one fp8 step apart at most (2**-9 subnormal, 2**-3 relative normal).
MEAN_TOL = {torch.bfloat16: dict(atol=4e-3, rtol=8e-3), torch.float16: dict(atol=5e-4, rtol=1e-3),
            torch.float32: dict(atol=1e-6, rtol=1e-5), FP8: dict(atol=2 ** -9, rtol=2 ** -3)}


def make_kv(num_blocks=12, block_size=16, heads=2, head_dim=64, dtype=torch.bfloat16, seed=0):
    """K as ``kv[0]`` of a ``(2, num_blocks, block_size, heads, head_dim)`` cache: a strided view."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, num_blocks, block_size, heads, head_dim, generator=gen).to(dtype)
    return kv.to(DEVICE)[0]


def same_bits(a, b):
    """Bitwise equality (NaN == NaN) of two same-dtype tensors."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def random_reprs(key_cache, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*r.shape, generator=gen).to(dtype).to(DEVICE) for r in empty_block_repr(key_cache, dtype)]


@pytest.mark.parametrize("cache_dtype,repr_dtype,block_size,head_dim", [
    (torch.bfloat16, torch.bfloat16, 16, 128),
    (torch.bfloat16, torch.float32, 16, 64),
    (torch.float16, torch.float16, 12, 96),
    (torch.float16, torch.float32, 32, 64),
    (torch.float32, torch.float32, 16, 64),
])
@pytest.mark.parametrize("update", [update_block_repr, torch_update_block_repr], ids=["kernel", "torch"])
def test_update_matches_reference_and_touches_only_listed_blocks(cache_dtype, repr_dtype, block_size, head_dim,
                                                                 update):
    key_cache = make_kv(block_size=block_size, head_dim=head_dim, dtype=cache_dtype)
    key_before = key_cache.clone()
    block_ids = torch.tensor([5, -1, 0, 11, 5, 40, 3], dtype=torch.int32, device=DEVICE)  # dup, pad, out of range
    listed = torch.tensor([0, 3, 5, 11], device=DEVICE)
    reprs = random_reprs(key_cache, repr_dtype)
    for repr_ in reprs:
        repr_[listed] = float("nan")
    expected = [r.clone() for r in reprs]
    update(key_cache, block_ids, *reprs)
    naive_update_block_repr(key_cache, block_ids, *expected)
    assert torch.equal(key_cache, key_before)
    kmin, kmax, kmean = reprs
    assert torch.equal(kmin, expected[0]) and torch.equal(kmax, expected[1])  # min/max exact, whole tensors
    untouched = torch.ones(key_cache.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[listed] = False
    assert torch.equal(kmean[untouched], expected[2][untouched])
    assert not kmean.isnan().any()
    torch.testing.assert_close(kmean, expected[2], **MEAN_TOL[repr_dtype])


@pytest.mark.parametrize("programs", [1, 3, 128])
@pytest.mark.parametrize("repr_dtype", [torch.bfloat16, FP8])
def test_ranges_update_equals_the_listed_ids(programs, repr_dtype):
    """Row ranges (clamped to the table, empty ones, shared and padded blocks) write exactly the reprs that the
    ids they name would, and nothing else, whatever the program count."""
    key_cache = make_kv(num_blocks=20)
    table = torch.tensor([[3, 7, 19, 2, -1], [7, 4, 0, -1, -1], [5, 6, 8, 9, 10], [11, 12, 13, 14, 15]],
                         dtype=torch.int32, device=DEVICE)
    first = torch.tensor([0, 1, 4, 2], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([5, 2, 4, 9], dtype=torch.int64, device=DEVICE)  # row 0 reaches a pad, row 3 past the table
    named = torch.tensor([3, 7, 19, 2, 4, 13, 14, 15], dtype=torch.int32, device=DEVICE)
    reprs = random_reprs(key_cache, repr_dtype)[:3]
    if repr_dtype == FP8:
        reprs.append(torch.ones(key_cache.shape[0], key_cache.shape[2], device=DEVICE))  # kscale
    expected = [r.clone() for r in reprs]
    update_block_repr_ranges(key_cache, table, first, end, *reprs, programs=programs)
    update_block_repr(key_cache, named, *expected)
    assert all(same_bits(got.view(torch.uint8), want.view(torch.uint8)) if got.dtype == FP8
               else torch.equal(got, want) for got, want in zip(reprs, expected))


def test_bad_ranges_raise_naming_the_argument():
    key_cache = make_kv()
    reprs = empty_block_repr(key_cache)
    table = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    bounds = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_table"):
        update_block_repr_ranges(key_cache, table.float(), bounds, bounds, *reprs)
    with pytest.raises(ValueError, match=r"end: got shape \(3,\)"):
        update_block_repr_ranges(key_cache, table, bounds, torch.zeros(3, dtype=torch.int32, device=DEVICE), *reprs)
    with pytest.raises(ValueError, match="programs: got 0"):
        update_block_repr_ranges(key_cache, table, bounds, bounds, *reprs, programs=0)


def test_int64_ids_and_noncontiguous_reprs():
    key_cache = make_kv(heads=4)
    storage = torch.full((key_cache.shape[0], 4, 3, 64), float("nan"), device=DEVICE)
    kmin, kmax, kmean = storage.unbind(2)  # interleaved, same strides
    ids = torch.arange(key_cache.shape[0], dtype=torch.int64, device=DEVICE)
    update_block_repr(key_cache, ids, kmin, kmax, kmean)
    keys = key_cache.float()
    assert torch.equal(kmin, keys.amin(1)) and torch.equal(kmax, keys.amax(1))
    torch.testing.assert_close(kmean, keys.mean(1), **MEAN_TOL[torch.float32])


def test_empty_block_ids_is_a_no_op():
    key_cache = make_kv()
    reprs = random_reprs(key_cache, torch.bfloat16)
    before = [r.clone() for r in reprs]
    update_block_repr(key_cache, torch.empty(0, dtype=torch.int32, device=DEVICE), *reprs)
    assert all(torch.equal(r, b) for r, b in zip(reprs, before))


def loop_blocks_filled(before, after, block_table, block_size):
    ids = []
    for b in range(block_table.shape[0]):
        first, end = int(before[b]) // block_size, min(int(after[b]) // block_size, block_table.shape[1])
        ids += [int(block_table[b, j]) for j in range(first, end)]
    return ids


def test_blocks_filled_matches_a_plain_loop():
    block_table = torch.randperm(64, dtype=torch.int32).view(4, 16).to(DEVICE)
    before = torch.tensor([0, 15, 33, 250], dtype=torch.int32, device=DEVICE)  # new, 1 to fill, no change, shrunk
    after = torch.tensor([70, 16, 40, 20], dtype=torch.int32, device=DEVICE)
    got = blocks_filled(before, after, block_table, 16)
    assert got.dtype == torch.int32 and got.tolist() == loop_blocks_filled(before, after, block_table, 16)


def test_incremental_updates_equal_a_full_recompute():
    """Decode steps of a ragged batch: update only the newly full blocks, compare with all full blocks at once."""
    block_size, max_blocks, batch = 8, 6, 3
    key_cache = make_kv(num_blocks=batch * max_blocks, block_size=block_size)
    block_table = torch.randperm(batch * max_blocks, dtype=torch.int32).view(batch, max_blocks).to(DEVICE)
    seq_lens = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    reprs = [torch.full_like(r, float("nan")) for r in empty_block_repr(key_cache)]
    for growth in ([5, 13, 0], [1, 3, 9], [2, 1, 7], [9, 1, 1], [4, 5, 8]):  # prefill, then ragged steps
        new_lens = seq_lens + torch.tensor(growth, dtype=torch.int32, device=DEVICE)
        update_block_repr(key_cache, blocks_filled(seq_lens, new_lens, block_table, block_size), *reprs)
        seq_lens = new_lens
    full = blocks_filled(torch.zeros_like(seq_lens), seq_lens, block_table, block_size)
    expected = [torch.full_like(r, float("nan")) for r in reprs]
    naive_update_block_repr(key_cache, full, *expected)
    assert same_bits(reprs[0], expected[0]) and same_bits(reprs[1], expected[1])  # NaN where never full
    torch.testing.assert_close(reprs[2], expected[2], equal_nan=True, **MEAN_TOL[torch.bfloat16])


def test_empty_block_repr_defaults_to_the_cache_dtype():
    key_cache = make_kv(heads=3, head_dim=32)
    kmin, kmax, kmean = empty_block_repr(key_cache)
    assert kmin.shape == kmax.shape == kmean.shape == (12, 3, 32) and kmin.dtype == torch.bfloat16
    assert empty_block_repr(key_cache, torch.float32)[2].dtype == torch.float32


def _bad_update_args():
    key_cache = make_kv()
    ids = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    reprs = empty_block_repr(key_cache)
    wide = torch.empty(12, 2, 128, dtype=torch.bfloat16, device=DEVICE)[:, :, :64]
    return [
        ("key_cache", (key_cache[0], ids, *reprs)),
        ("key_cache", (key_cache.to(torch.int32), ids, *reprs)),
        ("block_ids", (key_cache, ids.float(), *reprs)),
        ("block_ids", (key_cache, ids.view(1, 1), *reprs)),
        ("kmin", (key_cache, ids, reprs[0][:5], *reprs[1:])),
        ("kmax", (key_cache, ids, reprs[0], reprs[1].to(torch.int32), reprs[2])),
        ("kmean", (key_cache, ids, reprs[0], reprs[1], reprs[2][:, :1])),
        ("kmean", (key_cache, ids, reprs[0], reprs[1], wide)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_update_arguments_raise_naming_the_argument(case):
    name, args = _bad_update_args()[case]
    with pytest.raises(ValueError, match=name):
        update_block_repr(*args)


@pytest.mark.parametrize("name,kwargs", [
    ("block_size", dict(block_size=0)),
    ("block_table", dict(block_table=torch.zeros(4, dtype=torch.int32))),
    ("seq_lens_before", dict(seq_lens_before=torch.zeros(3, dtype=torch.int32))),
    ("seq_lens_after", dict(seq_lens_after=torch.zeros(2, dtype=torch.float32))),
])
def test_bad_blocks_filled_arguments_raise_naming_the_argument(name, kwargs):
    args = dict(seq_lens_before=torch.zeros(2, dtype=torch.int32), seq_lens_after=torch.ones(2, dtype=torch.int32),
                block_table=torch.zeros(2, 4, dtype=torch.int32), block_size=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        blocks_filled(**args)


def keys_with_outliers(dtype, num_blocks=10, block_size=16, heads=2, head_dim=64, seed=3):
    """K (a strided ``kv[0]`` view) whose blocks span the fp8 range and beyond: plain, x1000 (past e4m3fn's 448),
    one huge key beside small ones (their scaled values underflow fp32), tiny keys (fp8 subnormal without a
    scale), keys already on the fp8 grid (must stay exact), mixed signs per channel."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, num_blocks, block_size, heads, head_dim, generator=gen)
    keys = kv[0]
    keys[1] *= 1000
    keys[2, 5, 0, 7] = 3e4 if dtype == torch.float16 else 3e38
    keys[2, :, :, 20:] *= 1e-3
    keys[3] *= 1e-5 if dtype == torch.float16 else 1e-30
    keys[4] = keys[4].to(FP8).float() * 2.0 ** -12
    keys[5, :, 1] += 400
    keys[6, :, 0] -= 300
    return kv.to(dtype).to(DEVICE)[0]


def fp8_bits(repr_):
    return repr_.view(torch.uint8)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("update", [update_block_repr, torch_update_block_repr], ids=["kernel", "torch"])
def test_fp8_update_matches_reference_and_rounds_outward(cache_dtype, update):
    key_cache = keys_with_outliers(cache_dtype)
    key_before = key_cache.clone()
    block_ids = torch.tensor([2, -1, 0, 9, 2, 40, 1, 3, 4, 5, 6], dtype=torch.int32, device=DEVICE)
    listed = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9], device=DEVICE)
    reprs = [r.fill_(float("nan")) for r in empty_block_repr(key_cache, FP8)]
    expected = [r.clone() for r in reprs]
    update(key_cache, block_ids, *reprs)
    naive_update_block_repr(key_cache, block_ids, *expected)
    assert torch.equal(key_cache, key_before)
    kmin, kmax, kmean, kscale = reprs
    assert torch.equal(fp8_bits(kmin), fp8_bits(expected[0])) and torch.equal(fp8_bits(kmax), fp8_bits(expected[1]))
    assert torch.equal(kscale.view(torch.int32), expected[3].view(torch.int32))  # whole tensors, NaN where unlisted
    untouched = torch.ones(key_cache.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[listed] = False
    assert torch.equal(fp8_bits(kmean[untouched]), fp8_bits(expected[2][untouched]))
    torch.testing.assert_close(kmean[listed].float(), expected[2][listed].float(), **MEAN_TOL[FP8])
    keys = key_cache[listed].float()
    scale = kscale[listed][..., None]
    assert not any(r[listed].float().isnan().any() for r in reprs[:3])
    assert (kmin[listed].float() * scale <= keys.amin(1)).all() and (kmax[listed].float() * scale >= keys.amax(1)).all()
    peak = keys.abs().amax(dim=(1, 3))
    assert ((peak / kscale[listed] >= 128) & (peak / kscale[listed] < 256)).all()
    on_grid = key_cache[4].float()  # keys already on the fp8 grid: min and max stay exact
    assert torch.equal(kmin[4].float() * kscale[4][:, None], on_grid.amin(0))
    assert torch.equal(kmax[4].float() * kscale[4][:, None], on_grid.amax(0))


def test_fp8_reprs_are_the_nearest_outward_values():
    """kmin is the largest fp8 value <= min / kscale and kmax the smallest >= max / kscale (one step, no more)."""
    key_cache = keys_with_outliers(torch.bfloat16)
    kmin, kmax, kmean, kscale = empty_block_repr(key_cache, FP8)
    update_block_repr(key_cache, torch.arange(key_cache.shape[0], device=DEVICE), kmin, kmax, kmean, kscale)
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[~grid.isnan()].to(DEVICE).sort().values
    keys = key_cache.float()
    low, high = keys.amin(1) / kscale[..., None], keys.amax(1) / kscale[..., None]
    assert torch.equal(kmin.float(), grid[torch.searchsorted(grid, low, right=True) - 1])
    assert torch.equal(kmax.float(), grid[torch.searchsorted(grid, high)])


def test_fp8_reprs_beside_wider_ones():
    """Each repr keeps its own dtype: fp8 kmin/kmax with a bf16 kmean (stored unscaled) and the scales."""
    key_cache = keys_with_outliers(torch.bfloat16)
    kmin, kmax, _, kscale = empty_block_repr(key_cache, FP8)
    kmean = empty_block_repr(key_cache)[2]
    ids = torch.arange(key_cache.shape[0], device=DEVICE)
    update_block_repr(key_cache, ids, kmin, kmax, kmean, kscale)
    expected = [*empty_block_repr(key_cache, FP8)[:2], torch.empty_like(kmean), torch.empty_like(kscale)]
    naive_update_block_repr(key_cache, ids, *expected)
    assert torch.equal(fp8_bits(kmin), fp8_bits(expected[0])) and torch.equal(fp8_bits(kmax), fp8_bits(expected[1]))
    assert torch.equal(kscale, expected[3])
    torch.testing.assert_close(kmean, expected[2], **MEAN_TOL[torch.bfloat16])


def test_empty_block_repr_fp8_adds_the_scales():
    key_cache = make_kv(heads=3, head_dim=32)
    kmin, kmax, kmean, kscale = empty_block_repr(key_cache, FP8)
    assert kmin.dtype == kmax.dtype == kmean.dtype == FP8 and kmin.shape == (12, 3, 32)
    assert kscale.dtype == torch.float32 and kscale.shape == (12, 3) and kscale.device == key_cache.device


@pytest.mark.parametrize("change", ["no kscale", "kscale shape", "kscale dtype"])
def test_bad_fp8_scales_raise_naming_kscale(change):
    key_cache = make_kv()
    ids = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    kmin, kmax, kmean, kscale = empty_block_repr(key_cache, FP8)
    kscale = {"no kscale": None, "kscale shape": kscale[:, :1], "kscale dtype": kscale.double()}[change]
    with pytest.raises(ValueError, match="kscale"):
        update_block_repr(key_cache, ids, kmin, kmax, kmean, kscale)
