"""``ucm demo``: the tiered store and GSA on local files and plain tensors, with the figures users watch.

1. Prefix reuse: request A's prompt blocks are gathered out of a paged KV cache, dumped and committed to a
   ``Cache|Posix`` store under chained block hashes; request B shares A's first blocks, finds them with
   ``lookup_on_prefix`` from a fresh store (cold DRAM tier, so they come from disk), loads them into other cache
   blocks and checks them bit-exact.
2. GSA: one decode step over a long paged context that hides a few "needle" keys; the top blocks by Quest bound
   plus the windows (sparse_ratio 0.3) are attended and compared with dense attention.
3. The seed's section 7.2 monitor lines: hit rate, load speed, save speed.
Runs on a CPU in seconds (Triton kernels in interpreter mode there), and on a GPU as is.
"""
import time
from pathlib import Path

import torch

from ucm_kernels.block_repr import empty_block_repr, update_block_repr
from ucm_kernels.block_select import select_blocks
from ucm_kernels.kv_transfer import detect_layout, gather_blocks, scatter_blocks
from ucm_kernels.sparse_decode import dense_decode, sparse_decode
from ucm_store.factory import UcmConnectorFactory
from ucm_store.hashing import BlockHasher, HashNamespace
from ucm_store.metrics import StatsMonitor

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 64, 16


def run_demo(directory: str) -> int:
    """Run the three parts under ``directory`` (created if missing); returns 0 when every check passed."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ok = demo_prefix_reuse(root / "store") and demo_gsa()
    print_monitor()
    return 0 if ok else 1


def paged_cache(num_blocks: int, seed: int) -> list[torch.Tensor]:
    """Per-layer FlashAttention-layout caches ``(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)`` of random bf16."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).bfloat16() for _ in range(LAYERS)]


def demo_prefix_reuse(store_dir: Path) -> bool:
    config = {"store_pipeline": "Cache|Posix", "storage_backends": str(store_dir), "cache_capacity": 256}
    hasher = BlockHasher(HashNamespace("demo-llama", "bfloat16", "flash_attn", BLOCK))
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 32000, (40 * BLOCK,), generator=gen)
    prompt_a = torch.cat([shared, torch.randint(0, 32000, (8 * BLOCK,), generator=gen)])
    prompt_b = torch.cat([shared, torch.randint(0, 32000, (8 * BLOCK,), generator=gen)])
    cache_a = paged_cache(64, seed=1)
    ids_a = hasher.block_ids(prompt_a.tolist())
    a_blocks = torch.arange(len(ids_a))
    layout = detect_layout(cache_a)
    with UcmConnectorFactory.create_connector(config, local_rank=0) as store:
        rows = gather_blocks(cache_a, a_blocks, layout=layout).view(len(ids_a), -1)
        store.wait(store.dump(ids_a, 0, rows))
        committed = sum(store.commit(ids_a, [True] * len(ids_a)))
    print(f"[store] request A: {committed} blocks of {layout.row_bytes // 1024} KiB committed to Cache|Posix "
          f"at {store_dir}")
    ids_b = hasher.block_ids(prompt_b.tolist())
    with UcmConnectorFactory.create_connector(config, local_rank=0) as store:
        hits = store.lookup_on_prefix(ids_b) + 1
        cache_b = paged_cache(64, seed=2)
        targets = torch.arange(20, 20 + hits)
        loaded = torch.empty(hits, layout.row_bytes, dtype=torch.uint8)
        status = store.wait(store.load(ids_b[:hits], 0, loaded))
        scatter_blocks(loaded, targets, cache_b, layout=layout)
    exact = all(torch.equal(b[:, targets], a[:, :hits]) for a, b in zip(cache_a, cache_b))
    print(f"[store] request B: {hits} of {len(ids_b)} prompt blocks hit (shared prefix: {len(shared) // BLOCK}); "
          f"loaded from disk {'bit-exact' if exact and status == 0 else 'WITH ERRORS'}")
    return exact and status == 0 and hits == len(shared) // BLOCK


def demo_gsa(context: int = 4000, ratio: float = 0.3) -> bool:
    gen = torch.Generator().manual_seed(3)
    num_blocks = -(-context // BLOCK)
    kv = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).bfloat16()
    q = torch.randn(1, Q_HEADS, HEAD_DIM, generator=gen).bfloat16()
    needles = torch.randperm(num_blocks - 8, generator=gen)[:3] + 2
    for block in needles.tolist():  # keys strongly aligned with every query head of the group
        kv[0, block, 5] = (q[0].view(KV_HEADS, -1, HEAD_DIM).float().mean(1) * 12).bfloat16()
    table = torch.arange(num_blocks, dtype=torch.int32)[None]
    seq_lens = torch.tensor([context], dtype=torch.int32)
    kmin, kmax, kmean = empty_block_repr(kv[0])
    update_block_repr(kv[0], torch.arange(context // BLOCK), kmin, kmax, kmean)
    start = time.perf_counter()
    sel_idx, sel_count = select_blocks(q, kmin, kmax, kmean, table, seq_lens, block_size=BLOCK, sparse_ratio=ratio,
                                       init_window=1, local_window=4, min_blocks=8)
    sparse = sparse_decode(q, kv[0], kv[1], table, seq_lens, sel_idx, sel_count)
    elapsed = time.perf_counter() - start
    dense = dense_decode(q, kv[0], kv[1], table, seq_lens)
    error = float((sparse.float() - dense.float()).norm() / dense.float().norm())
    chosen = [set(sel_idx[0, h, :sel_count[0, h]].tolist()) for h in range(KV_HEADS)]
    found = all(set(needles.tolist()) <= c for c in chosen)
    print(f"[gsa] context {context} tokens ({num_blocks} blocks), sparse_ratio {ratio}: attended "
          f"{int(sel_count[0, 0])} blocks per KV head; needles {sorted(needles.tolist())} "
          f"{'all selected' if found else 'MISSED'}; output error vs dense {error:.2e} ({elapsed * 1e3:.0f} ms)")
    return found and error < 0.1


def print_monitor() -> None:
    stats = StatsMonitor.get_instance().get_stats()
    print(f"命中率 (hit rate): {stats.get('hit_rate', 0) * 100:.1f}%")
    print(f"加载速度 (load speed): {stats.get('load_speed', 0) / 1e9:.2f} GB/s")
    print(f"保存速度 (save speed): {stats.get('save_speed', 0) / 1e9:.2f} GB/s")
