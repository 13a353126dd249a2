"""ucm_kernels.residency: the torch twin and the Triton bookkeeping against the loop reference (the same victims and
admitted pieces; Triton equals the twin entry for entry in the interpreter), the twin keeps the pool's invariants,
and copy_rows moves rows exactly."""
import pytest
import torch

from ucm_kernels.residency import (admit, admit_selection, copy_rows, naive_admit, naive_selection_pieces,
                                   selection_pieces, torch_admit, torch_admit_selection, torch_copy_rows,
                                   torch_write_tokens, write_tokens)
from ucm_kernels.residency import triton as residency_triton
from ucm_kernels.residency.torch import AGE_CAP, slot_ages

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_pool(capacity: int, pieces: int, seed: int, now: int = 40, pinned_share: float = 0.1) -> dict:
    """A consistent pool: a random subset of pieces resident, stamps of past steps (some NEVER), some pinned."""
    gen = torch.Generator().manual_seed(seed)
    resident = torch.randperm(pieces, generator=gen)[:capacity * 3 // 4]
    slots = torch.randperm(capacity, generator=gen)[:resident.numel()]
    slot_of = torch.full((pieces,), -1, dtype=torch.int64)
    piece_in = torch.full((capacity,), -1, dtype=torch.int64)
    stamp = torch.full((capacity,), -1, dtype=torch.int64)
    slot_of[resident], piece_in[slots] = slots, resident
    stamp[slots] = torch.randint(0, now, (slots.numel(),), generator=gen)
    pinned = torch.zeros(capacity, dtype=torch.bool)
    pinned[slots[torch.rand(slots.numel(), generator=gen) < pinned_share]] = True
    return {"slot_of": slot_of, "piece_in": piece_in, "stamp": stamp, "pinned": pinned}


def wanted_pieces(pieces: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(pieces, generator=gen)[:n], torch.rand(n, generator=gen) < 0.8


def on(device: str, state: dict) -> dict:
    return {name: tensor.clone().to(device) for name, tensor in state.items()}


def check_consistent(state: dict) -> None:
    """slot_of and piece_in are inverse maps."""
    held = (state["piece_in"] >= 0).nonzero().flatten()
    assert torch.equal(state["slot_of"][state["piece_in"][held]], held)
    assert int((state["slot_of"] >= 0).sum()) == held.numel()


@pytest.mark.parametrize("capacity,pieces,n,max_new", [(300, 2000, 250, 10_000), (1500, 5000, 1200, 10_000),
                                                       (300, 2000, 250, 17), (2048, 2048, 3000, 10_000),
                                                       (4097, 9000, 4000, 10_000)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("slot_tile", [None, 64])
def test_triton_admit_equals_torch(capacity, pieces, n, max_new, seed, slot_tile, monkeypatch):
    """Also with the victim search's tiles made small (64 slots, 2 tiles' histograms a step): tens of tiles and
    steps, as a pool of 100K+ slots has at the real sizes."""
    if slot_tile is not None:
        monkeypatch.setattr(residency_triton, "_SLOT_TILE", slot_tile)
        monkeypatch.setattr(residency_triton, "_PREFIX_ROWS", 2)
    state = random_pool(capacity, pieces, seed)
    wanted_ids, wanted = wanted_pieces(pieces, min(n, pieces), seed)
    n = wanted_ids.numel()
    ref, got = on("cpu", state), on(DEVICE, state)
    ref_tally, got_tally = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64, device=DEVICE)
    kwargs = dict(below=80, stamp_value=80, max_new=max_new)
    want = torch_admit(*ref.values(), wanted_ids, wanted, tally=ref_tally, **kwargs)
    have = admit(*got.values(), wanted_ids.to(DEVICE), wanted.to(DEVICE), tally=got_tally, **kwargs)
    count = int(want[3][0])
    assert int(have[3][0]) == count and count > 0 and torch.equal(got_tally.cpu(), ref_tally)
    assert torch.equal(have[2][:count].sort().values.cpu(), want[2][:count].sort().values)  # the same victims
    if DEVICE == "cpu":  # the interpreter runs programs in order: the same slots
        assert torch.equal(have[0], want[0])
        assert torch.equal(have[1][:count], want[1][:count]) and torch.equal(have[2][:count], want[2][:count])
        for name in state:
            assert torch.equal(got[name], ref[name]), name
    check_consistent({k: v.cpu() for k, v in got.items()})
    assert n == wanted_ids.numel()


@pytest.mark.parametrize("capacity,pieces,n,max_new", [(300, 2000, 250, 10_000), (300, 2000, 250, 17),
                                                       (64, 1000, 300, 10_000)])
@pytest.mark.parametrize("seed", [0, 1])
def test_admit_agrees_with_the_loop_reference(capacity, pieces, n, max_new, seed):
    """Twin and kernels give every hit its slot, take the same victims and bring in the same pieces as the loop
    reference; the pool afterwards holds the same pieces with the same stamps."""
    state = random_pool(capacity, pieces, seed)
    wanted_ids, wanted = wanted_pieces(pieces, n, seed)
    kwargs = dict(below=80, stamp_value=80, max_new=max_new)
    want = naive_admit(*state.values(), wanted_ids, wanted, **kwargs)
    assert want["victims"], "the case should evict"
    for admit_fn, device in ((torch_admit, "cpu"), (admit, DEVICE)):
        pool = on(device, state)
        slots, fetch_pieces, fetch_slots, count = admit_fn(*pool.values(), wanted_ids.to(device), wanted.to(device),
                                                           **kwargs)
        count = int(count[0])
        assert set(fetch_slots[:count].tolist()) == want["victims"], admit_fn.__module__
        assert set(fetch_pieces[:count].tolist()) == want["admitted"], admit_fn.__module__
        hits = [k for k, slot in enumerate(want["slots"]) if slot >= 0 and int(wanted_ids[k]) not in want["admitted"]]
        assert [int(slots[k]) for k in hits] == [want["slots"][k] for k in hits]
        assert ((slots.cpu() >= 0) == torch.tensor([slot >= 0 for slot in want["slots"]])).all()
        held = {(p, t) for p, t in zip(pool["piece_in"].tolist(), pool["stamp"].tolist()) if p >= 0}
        assert held == {(p, t) for p, t in zip(want["piece_in"], want["stamp"]) if p >= 0}, admit_fn.__module__


def test_selection_pieces_equals_the_loop_reference():
    sel_idx, sel_count, block_table = random_selection(3, 4, 40, 60, host_blocks=500, seed=4)
    assert selection_pieces(sel_idx, sel_count, block_table).tolist() == naive_selection_pieces(sel_idx, sel_count,
                                                                                               block_table)


def random_selection(batch: int, heads: int, width: int, blocks: int, host_blocks: int, seed: int):
    """Per (request, KV head) distinct logical blocks, -1 padded past a random count; distinct host blocks."""
    gen = torch.Generator().manual_seed(seed)
    sel_idx = torch.full((batch, heads, width), -1, dtype=torch.int32)
    sel_count = torch.randint(1, width + 1, (batch, heads), generator=gen).int()
    for b in range(batch):
        for h in range(heads):
            n = int(sel_count[b, h])
            sel_idx[b, h, :n] = torch.randperm(blocks, generator=gen)[:n].int()
    table = torch.randperm(host_blocks, generator=gen)[:batch * blocks].view(batch, blocks).int()
    return sel_idx, sel_count, table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_admit_selection_lists_pieces_and_writes_the_slot_table(seed):
    batch, heads, width, blocks = 3, 4, 40, 60
    sel_idx, sel_count, block_table = random_selection(batch, heads, width, blocks, host_blocks=500, seed=seed)
    state = random_pool(capacity=700, pieces=500 * heads, seed=seed)
    ref, got = on("cpu", state), on(DEVICE, state)
    kwargs = dict(below=80, stamp_value=80, max_new=10_000)
    table, pieces, fetch_pieces, fetch_slots, count = torch_admit_selection(*ref.values(), sel_idx, sel_count,
                                                                            block_table, **kwargs)
    want = selection_pieces(sel_idx, sel_count, block_table)
    assert torch.equal(pieces, want) and int((want >= 0).sum()) == int(sel_count.sum())
    for b in range(batch):
        for h in range(heads):
            for j in range(int(sel_count[b, h])):
                logical = int(sel_idx[b, h, j])
                assert int(want[b, h, j]) == int(block_table[b, logical]) * heads + h
                assert int(table[b * heads + h, logical]) == int(ref["slot_of"][want[b, h, j]])
    have = admit_selection(*got.values(), sel_idx.to(DEVICE), sel_count.to(DEVICE), block_table.to(DEVICE),
                           **kwargs)
    assert torch.equal(have[1].cpu(), pieces) and int(have[4][0]) == int(count[0]) > 0
    listed = pieces >= 0  # the kernel's table is defined at listed entries only
    rows = torch.arange(batch * heads).view(batch, heads, 1).expand_as(listed)
    slots = have[0].cpu()[rows[listed], sel_idx[listed].long()]
    assert torch.equal(got["slot_of"].cpu()[pieces[listed]], slots.long())
    if DEVICE == "cpu":  # the interpreter runs programs in order: the same slots as the torch twin
        assert torch.equal(slots, table[rows[listed], sel_idx[listed].long()])
        for name in state:
            assert torch.equal(got[name], ref[name]), name
    check_consistent({k: v.cpu() for k, v in got.items()})


def test_admit_selection_reads_padded_rows_in_place():
    """Lists and a block table in rows padded to 16 entries (as GSA allocates them) admit exactly what their
    contiguous copies admit."""
    batch, heads, width, blocks = 2, 4, 21, 37
    sel_idx, sel_count, block_table = random_selection(batch, heads, width, blocks, host_blocks=300, seed=5)
    padded_idx = torch.full((batch, heads, 32), 7, dtype=torch.int32)[..., :width]
    padded_table = torch.zeros(batch, 48, dtype=torch.int32)[:, :blocks]
    padded_idx.copy_(sel_idx)
    padded_table.copy_(block_table)
    state = random_pool(capacity=400, pieces=300 * heads, seed=5)
    kwargs = dict(below=80, stamp_value=80, max_new=10_000)
    plain, padded = on(DEVICE, state), on(DEVICE, state)
    want = admit_selection(*plain.values(), *(t.to(DEVICE) for t in (sel_idx, sel_count, block_table)), **kwargs)
    got = admit_selection(*padded.values(), *(t.to(DEVICE) for t in (padded_idx, sel_count, padded_table)),
                          **kwargs)
    listed = want[1] >= 0
    rows = torch.arange(batch * heads, device=DEVICE).view(batch, heads, 1).expand_as(listed)
    logical = sel_idx.to(DEVICE)[listed].long()
    assert torch.equal(got[1], want[1]) and got[0].stride(0) % 16 == 0
    assert torch.equal(got[0][rows[listed], logical], want[0][rows[listed], logical])
    for name in state:
        assert torch.equal(padded[name], plain[name]), name


@pytest.mark.parametrize("seed", [0, 1])
def test_admit_selection_with_rows_copies_exactly_the_admitted_rows(seed):
    """Both implementations: each admitted piece's host row lands in its slot's row; no other row is written."""
    batch, heads, width, blocks, capacity = 3, 4, 40, 60, 700
    sel_idx, sel_count, block_table = random_selection(batch, heads, width, blocks, host_blocks=500, seed=seed)
    state = random_pool(capacity, pieces=500 * heads, seed=seed)
    host = torch.randn(500 * heads, 24, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    host = host.pin_memory() if DEVICE == "cuda" else host
    for admit_fn, device in ((torch_admit_selection, "cpu"), (admit_selection, DEVICE)):
        pool_rows = torch.full((capacity, 24), float("nan"), dtype=torch.bfloat16, device=device)
        _, _, fetch_pieces, fetch_slots, count = admit_fn(
            *on(device, state).values(), sel_idx.to(device), sel_count.to(device), block_table.to(device),
            below=80, stamp_value=80, max_new=10_000, rows=(host, pool_rows))
        n = int(count[0])
        slots, pieces = fetch_slots[:n].cpu(), fetch_pieces[:n].cpu()
        assert n > 0 and torch.equal(pool_rows.cpu()[slots], host[pieces]), admit_fn.__module__
        untouched = torch.ones(capacity, dtype=torch.bool)
        untouched[slots] = False
        assert pool_rows.cpu()[untouched].isnan().all(), admit_fn.__module__


@pytest.mark.parametrize("seed", [0, 1])
def test_admit_selection_with_tokens_writes_them_as_write_tokens_does(seed):
    """Tokens written by the first launch's extra programs: the pool, its state and the tables equal the torch twin's
    (write_tokens, then admit_selection); every written slot is pinned and its token in place."""
    batch, heads, width, blocks, capacity, block_size, head_dim = 3, 4, 40, 60, 700, 4, 8
    sel_idx, sel_count, block_table = random_selection(batch, heads, width, blocks, host_blocks=500, seed=seed)
    state = random_pool(capacity, pieces=500 * heads, seed=seed)
    resident = (state["slot_of"] >= 0).nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    token_pieces = resident[torch.randperm(resident.numel(), generator=gen)[:batch * heads]]
    offsets = torch.randint(0, block_size, (token_pieces.numel(),), generator=gen)
    key, value = torch.randn(2, token_pieces.numel(), head_dim, generator=gen)  # fp32: cast to the pool's bf16
    results = {}
    for name, admit_fn, device in (("torch", torch_admit_selection, "cpu"), ("triton", admit_selection, DEVICE)):
        pool = on(device, state)
        kv = torch.zeros(capacity, 2, block_size, 1, head_dim, dtype=torch.bfloat16, device=device)
        tokens = (kv, *(t.to(device) for t in (token_pieces, offsets, key, value)))
        out = admit_fn(*pool.values(), sel_idx.to(device), sel_count.to(device), block_table.to(device), below=80,
                       stamp_value=80, max_new=10_000, tokens=tokens)
        results[name] = {"kv": kv.cpu(), "pieces": out[1].cpu(), **{k: v.cpu() for k, v in pool.items()}}
    want, have = results["torch"], results["triton"]
    slots = want["slot_of"][token_pieces]
    assert bool(want["pinned"][slots].all()) and torch.equal(want["kv"][slots, 0, offsets, 0], key.bfloat16())
    assert torch.equal(have["kv"], want["kv"]) and torch.equal(have["pieces"], want["pieces"])
    assert torch.equal(have["pinned"], want["pinned"])
    if DEVICE == "cpu":  # programs in order: the same slots
        for name in state:
            assert torch.equal(have[name], want[name]), name


def test_admit_keeps_hits_and_pinned_slots_and_evicts_the_oldest_first():
    capacity, pieces = 400, 3000
    state = random_pool(capacity, pieces, seed=3)
    before = on("cpu", state)
    wanted_ids, wanted = wanted_pieces(pieces, 300, seed=3)
    slots, fetch_pieces, fetch_slots, count = torch_admit(*state.values(), wanted_ids, wanted, below=80,
                                                          stamp_value=80, max_new=10_000)
    n = int(count[0])
    was_resident = wanted & (before["slot_of"][wanted_ids] >= 0)
    assert torch.equal(slots[was_resident], before["slot_of"][wanted_ids[was_resident]])  # hits stay put
    assert n == int((wanted & ~was_resident).sum())  # room for every miss here
    assert (slots[wanted] >= 0).all() and (slots[~wanted] == -1).all()
    assert torch.equal(state["slot_of"][wanted_ids[wanted]], slots[wanted])
    assert (state["stamp"][slots[wanted]] == 80).all()
    victims = fetch_slots[:n]
    assert not before["pinned"][victims].any() and not torch.isin(victims, slots[was_resident]).any()
    assert torch.equal(fetch_pieces[:n], state["piece_in"][victims])
    ages = slot_ages(before["stamp"], before["pinned"], 80)
    ages[slots[was_resident]] = 0  # stamped by this call before victims were chosen
    spared = torch.ones(capacity, dtype=torch.bool)
    spared[victims] = False
    assert int(ages[victims].min()) >= int(ages[spared].max())  # nothing older was left behind
    check_consistent(state)


def test_admit_takes_at_most_max_new_and_only_what_can_be_evicted(monkeypatch):
    """The torch twin and the kernels (their victim search over 4 tiles of 16 slots) alike."""
    monkeypatch.setattr(residency_triton, "_SLOT_TILE", 16)
    base = random_pool(64, 1000, seed=5, pinned_share=0.0)
    base["pinned"][:40] = True
    wanted_ids, wanted = torch.arange(500, 600), torch.ones(100, dtype=torch.bool)
    resident = base["slot_of"][wanted_ids]
    missing = int((resident < 0).sum())
    evictable = 24 - int((resident >= 40).sum())  # unpinned slots, less the hits this call stamps
    assert missing > evictable  # more misses than slots to give them
    for max_new, expected in ((10, min(10, missing)), (10_000, min(missing, evictable))):
        for run, device in ((torch_admit, "cpu"), (admit, DEVICE)):
            state = on(device, base)
            slots, _, fetch_slots, count = run(*state.values(), wanted_ids.to(device), wanted.to(device), below=80,
                                               stamp_value=80, max_new=max_new)
            assert int(count[0]) == expected and int((slots >= 0).sum()) == 100 - missing + expected
            assert not base["pinned"][fetch_slots[:expected].cpu()].any()
            check_consistent({k: v.cpu() for k, v in state.items()})


def test_ages_put_free_and_old_slots_first_and_cap():
    stamp = torch.tensor([-1, 0, 79, 80, 10, 5])
    pinned = torch.tensor([False, False, False, False, True, False])
    assert slot_ages(stamp, pinned, 80).tolist() == [81, 80, 1, 0, 0, 75]
    assert slot_ages(torch.tensor([-1000]), torch.tensor([False]), 80).tolist() == [AGE_CAP]


@pytest.mark.parametrize("head_dim", [64, 96])
def test_write_tokens_writes_pins_and_stamps_like_the_torch_twin(head_dim):
    state = random_pool(capacity=50, pieces=400, seed=4)
    resident = (state["slot_of"] >= 0).nonzero().flatten()
    gen = torch.Generator().manual_seed(4)
    pieces = resident[torch.randperm(resident.numel(), generator=gen)[:7]]
    offsets = torch.randint(0, 16, (7,), generator=gen)
    key, value = (torch.randn(7, head_dim, generator=gen) for _ in range(2))
    kv = torch.randn(50, 2, 16, 1, head_dim, generator=gen).to(torch.bfloat16)
    ref, got = on("cpu", {**state, "kv": kv}), on(DEVICE, {**state, "kv": kv})
    want = torch_write_tokens(ref["kv"], ref["slot_of"], ref["stamp"], ref["pinned"], pieces, offsets, key, value,
                              stamp_value=90)
    have = write_tokens(got["kv"], got["slot_of"], got["stamp"], got["pinned"], pieces.to(DEVICE),
                        offsets.to(DEVICE), key.to(DEVICE), value.to(DEVICE), stamp_value=90)
    assert torch.equal(have.cpu(), want) and torch.equal(want, state["slot_of"][pieces])
    for name in ("kv", "stamp", "pinned"):
        assert torch.equal(got[name].cpu(), ref[name]), name
    assert torch.equal(ref["kv"][want, 1, offsets, 0], value.to(torch.bfloat16))
    assert ref["pinned"][want].all() and (ref["stamp"][want] == 90).all()
    assert int((ref["kv"] != kv).any(-1).sum()) == 14  # one K and one V token per piece, nothing else


@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 4096), (torch.float32, 33), (torch.int8, 7)])
def test_copy_rows_moves_exactly_the_counted_rows(dtype, width):
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(-100, 100, (50, width), generator=gen).to(dtype)
    dst = torch.zeros(40, width, dtype=dtype)
    src_idx = torch.tensor([3, 49, 0, -1, 7, 8, -5], dtype=torch.int64)  # -1: skipped; past the count: unread
    dst_idx = torch.tensor([39, 0, 5, 2, 6, 1, -5], dtype=torch.int64)
    count = torch.tensor([6], dtype=torch.int32)
    want = dst.clone()
    torch_copy_rows(src, want, src_idx, dst_idx, count)
    got = dst.to(DEVICE)
    copy_rows(src.to(DEVICE), got, src_idx.to(DEVICE), dst_idx.to(DEVICE), count.to(DEVICE), programs=3)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(want[39], src[3]) and torch.equal(want[1], src[8]) and int((want != 0).any(1).sum()) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host rows are read over PCIe by a GPU kernel")
def test_copy_rows_reads_and_writes_pinned_host_rows():
    host = torch.randn(64, 1024).to(torch.bfloat16).pin_memory()
    device_rows = torch.zeros(16, 1024, dtype=torch.bfloat16, device="cuda")
    idx = torch.arange(16, dtype=torch.int64, device="cuda")
    copy_rows(host, device_rows, idx * 4, idx, torch.tensor([16], dtype=torch.int32, device="cuda"))
    assert torch.equal(device_rows.cpu(), host[::4])
    back = torch.zeros(16, 1024, dtype=torch.bfloat16).pin_memory()
    copy_rows(device_rows, back, idx, idx.flip(0), torch.tensor([16], dtype=torch.int32, device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(back, host[::4].flip(0))


def test_bad_arguments_name_what_is_wrong():
    state = random_pool(8, 20, seed=0)
    sel_idx, sel_count, block_table = (t.to(DEVICE) for t in random_selection(2, 2, 3, 5, 20, seed=0))
    with pytest.raises(ValueError, match="sel_count"):
        admit_selection(*on(DEVICE, state).values(), sel_idx, sel_count[:1], block_table, below=1, stamp_value=1,
                        max_new=1)
    with pytest.raises(ValueError, match=r"sel_idx strides \(1, 2, 4\)"):
        admit_selection(*on(DEVICE, state).values(), sel_idx.transpose(0, 2).contiguous().transpose(0, 2), sel_count,
                        block_table, below=1, stamp_value=1, max_new=1)
    with pytest.raises(ValueError, match="pieces"):
        admit(*on(DEVICE, state).values(), torch.arange(3, dtype=torch.int32, device=DEVICE),
              torch.ones(3, dtype=torch.bool, device=DEVICE), below=1, stamp_value=1, max_new=1)
    pool = on(DEVICE, state)
    kv, one = torch.zeros(8, 2, 16, 1, 32, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"key: got shape \(1, 16\), expected \[1, 32\]"):
        write_tokens(kv, pool["slot_of"], pool["stamp"], pool["pinned"], one, one, torch.zeros(1, 16, device=DEVICE),
                     torch.zeros(1, 32, device=DEVICE), stamp_value=1)
    with pytest.raises(ValueError, match="kv: got shape"):
        write_tokens(kv.transpose(0, 1), pool["slot_of"], pool["stamp"], pool["pinned"], one, one,
                     torch.zeros(1, 32, device=DEVICE), torch.zeros(1, 32, device=DEVICE), stamp_value=1)
    with pytest.raises(ValueError, match="dst"):
        copy_rows(torch.zeros(2, 3, device=DEVICE), torch.zeros(2, 4, device=DEVICE),
                  torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE),
                  torch.ones(1, dtype=torch.int32, device=DEVICE))


def test_ids_outside_the_pool_and_tokens_for_absent_pieces_are_refused():
    """Out-of-range piece ids or token offsets would address memory outside the pool, and a token for a piece that
    is not resident would land in another piece's slot: each is a ValueError naming the argument."""
    state = random_pool(8, 20, seed=0)
    pool = on(DEVICE, state)
    with pytest.raises(ValueError, match=r"pieces: ids range 3..20, expected 0..19"):
        admit(*pool.values(), torch.tensor([3, 20], device=DEVICE), torch.ones(2, dtype=torch.bool, device=DEVICE),
              below=1, stamp_value=1, max_new=1)
    resident = int((state["slot_of"] >= 0).nonzero()[0])
    absent = int((state["slot_of"] < 0).nonzero()[0])
    kv, token = torch.zeros(8, 2, 16, 1, 32, device=DEVICE), torch.zeros(1, 32, device=DEVICE)
    for write, device in ((write_tokens, DEVICE), (torch_write_tokens, "cpu")):
        pool = on(device, state)
        with pytest.raises(ValueError, match="pieces: .*not resident"):
            write(kv.to(device), pool["slot_of"], pool["stamp"], pool["pinned"],
                  torch.tensor([absent], device=device), torch.zeros(1, dtype=torch.int64, device=device),
                  token.to(device), token.to(device), stamp_value=1)
    pool = on(DEVICE, state)
    with pytest.raises(ValueError, match=r"offsets: range 16..16, expected 0..15"):
        write_tokens(kv, pool["slot_of"], pool["stamp"], pool["pinned"], torch.tensor([resident], device=DEVICE),
                     torch.tensor([16], device=DEVICE), token, token, stamp_value=1)
