"""ucm_kernels.block_mass (the two-stage selection's per-block attention mass) against its loop reference: ragged
requests, blocks cut by seq_len, unlisted and -1 entries, GQA groups, block sizes; bad inputs named."""
import pytest
import torch

from ucm_kernels.block_mass import block_lse2, naive_block_lse2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_lists(seq_lens, kv_heads=2, group=4, head_dim=32, block_size=16, width=12, dtype=torch.bfloat16, seed=0):
    """Random paged keys (shuffled physical blocks), queries, and per (request, KV head) ascending lists of
    distinct logical blocks, some shorter than ``width``, one entry -1, one listed block past seq_len."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = len(seq_lens) * max(blocks) + 3
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    table = torch.randperm(num_blocks, generator=gen)[:len(seq_lens) * max(blocks)]
    table = table.view(len(seq_lens), max(blocks)).int()
    sel_idx = torch.full((len(seq_lens), kv_heads, width), -1, dtype=torch.int32)
    sel_count = torch.zeros(len(seq_lens), kv_heads, dtype=torch.int32)
    for b, nb in enumerate(blocks):
        for h in range(kv_heads):
            count = int(torch.randint(1, min(nb, width) + 1, (1,), generator=gen))
            sel_idx[b, h, :count] = torch.randperm(nb, generator=gen)[:count].sort().values.int()
            sel_count[b, h] = count
    sel_idx[0, 0, 0] = -1
    sel_idx[-1, -1, sel_count[-1, -1] - 1] = max(blocks) - 1 if len(seq_lens) > 1 else sel_idx[-1, -1, 0]
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen).to(dtype)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, key_cache, table, seq, sel_idx, sel_count)]


def check(args, scale=None):
    got = block_lse2(*args, scale=scale)
    expected = naive_block_lse2(*args, scale=scale)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert finite.any()
    torch.testing.assert_close(got[finite], expected[finite], atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("group,head_dim,block_size", [(4, 32, 16), (1, 64, 32), (3, 16, 8), (8, 128, 16)])
def test_matches_the_reference_on_ragged_lists(group, head_dim, block_size):
    check(make_lists([403, 17, 150, 229], group=group, head_dim=head_dim, block_size=block_size))


def test_fp16_and_a_given_scale():
    check(make_lists([300, 64], dtype=torch.float16), scale=0.3)


def test_entries_not_listed_or_past_the_sequence_are_minus_infinity():
    args = make_lists([403, 17, 150, 229])
    q, key_cache, table, seq_lens, sel_idx, sel_count = args
    got = block_lse2(*args).cpu()
    width = sel_idx.shape[2]
    unlisted = torch.arange(width) >= sel_count.cpu()[..., None]
    assert torch.isneginf(got[unlisted[:, :, None, :].expand_as(got)]).all()
    assert torch.isneginf(got[0, 0, :, 0]).all()  # the -1 entry


def test_mass_sums_to_one_over_a_list_that_covers_the_sequence():
    """log2-sum-exp of every block of one request, combined, is the log2-sum-exp of the whole row."""
    q, key_cache, table, seq_lens, _, _ = make_lists([150], kv_heads=1, group=2, head_dim=32)
    every = torch.arange(10, dtype=torch.int32, device=DEVICE).view(1, 1, 10)
    lse2 = block_lse2(q, key_cache, table, seq_lens, every, torch.full((1, 1), 10, dtype=torch.int32, device=DEVICE))
    keys = key_cache[table[0, :10].long()].flatten(0, 1)[:150, 0].float()
    whole = torch.logsumexp(q[0].float() @ keys.T * 32 ** -0.5, dim=-1) / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(torch.logsumexp(lse2[0, 0] * torch.log(torch.tensor(2.0)), -1).cpu()
                               / torch.log(torch.tensor(2.0)), whole.cpu(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name,change,match", [
    ("q", lambda a: a.__setitem__(0, a[0].float()), "q: got"),
    ("key_cache", lambda a: a.__setitem__(1, a[1][:, :, :, :16]), "key_cache: got"),
    ("key_cache", lambda a: a.__setitem__(1, a[1][:, :12]), "block_size 12 must be powers of two"),
    ("sel_idx", lambda a: a.__setitem__(4, a[4].long()), "sel_idx: got"),
    ("sel_count", lambda a: a.__setitem__(5, a[5][:1]), "expected 4 requests"),
])
def test_bad_inputs_raise_naming_the_argument(name, change, match):
    args = make_lists([403, 17, 150, 229])
    change(args)
    with pytest.raises(ValueError, match=match):
        block_lse2(*args)
