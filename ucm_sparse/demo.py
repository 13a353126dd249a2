"""``ucm demo``: the tiered store and GSA on local files and plain tensors, with the figures users watch.

1. Prefix reuse: request A's prompt blocks are gathered out of a paged KV cache, dumped and committed to a
   ``Cache|Posix`` store under chained block hashes; request B shares A's first blocks, finds them with
   ``lookup_on_prefix`` from a fresh store (cold DRAM tier, so they come from disk), loads them into other cache
   blocks and checks them bit-exact.
2. Store throughput: blocks the size of a Llama-3-8B block (2 MiB) saved to ``Cache|Posix``, written down to
   disk, then loaded back from the files by a fresh store and checked bit-exact, a few hundred MB in all, so that
   the speeds below measure bandwidth rather than per-call overhead.
3. GSA: one decode step over a long paged context that hides a few "needle" keys; the top blocks by Quest bound
   plus the windows (sparse_ratio 0.3) are attended and compared with dense attention.
4. The tuning guide's section 7.2 monitor lines: hit rate, load speed, save speed, each with what it counted.
Runs on a CPU in seconds (GSA's torch backend there, the KV copies by torch indexing) and on a GPU as is (the Triton
kernels); it needs no TRITON_INTERPRET.
"""
import shutil
import time
from pathlib import Path

import torch

from ucm_kernels.kv_transfer import detect_layout, gather_blocks, scatter_blocks
from ucm_store.factory import UcmConnectorFactory
from ucm_store.hashing import BlockHasher, HashNamespace
from ucm_store.metrics import StatsMonitor

from . import ops
from .config import GSAConfig

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 64, 16
LLAMA_8B_BLOCK_BYTES = 2 * 32 * 8 * 128 * 16 * 2  # K and V x 32 layers x 8 KV heads x head_dim 128 x 16 tokens, bf16
THROUGHPUT_BLOCKS = 128  # 256 MiB each way: about 2 s on 2 cores


def run_demo(directory: str) -> int:
    """Run the parts under ``directory`` (created if missing); returns 0 when every check passed."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    ok = demo_prefix_reuse(root / "store") and demo_throughput(root / "throughput") and demo_gsa()
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
        # The pool's first allocation imports Numba (about 1 s, once per process): pay it before any timed save.
        store.pool.release(store.pool.allocate(1))
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


def demo_throughput(store_dir: Path, blocks: int = THROUGHPUT_BLOCKS) -> bool:
    """Save ``blocks`` 2 MiB blocks, write them down to disk, load them back from the files through a fresh store
    (cold DRAM tier) and check them bit-exact; the files are removed afterwards."""
    config = {"store_pipeline": "Cache|Posix", "storage_backends": str(store_dir), "cache_capacity": blocks}
    ids = [f"llama-8b-block-{i}".encode() for i in range(blocks)]
    words = blocks * LLAMA_8B_BLOCK_BYTES // 8  # every 8-byte word distinct: any misplaced byte shows
    rows = torch.arange(words, dtype=torch.int64).view(torch.uint8).view(blocks, LLAMA_8B_BLOCK_BYTES)
    with UcmConnectorFactory.create_connector(config, local_rank=0) as store:
        start = time.perf_counter()
        saved = store.wait(store.dump(ids, 0, rows)) == 0 and all(store.commit(ids, [True] * blocks))
        staged = time.perf_counter() - start
        store.flush()
        written = time.perf_counter() - start
    loaded = torch.empty_like(rows)
    with UcmConnectorFactory.create_connector(config, local_rank=0) as store:
        start = time.perf_counter()
        hits = store.lookup_on_prefix(ids) + 1
        status = store.wait(store.load(ids, 0, loaded))
        read = time.perf_counter() - start
    exact = saved and hits == blocks and status == 0 and torch.equal(loaded, rows)
    shutil.rmtree(store_dir, ignore_errors=True)
    size = rows.numel()
    print(f"[store] throughput: {blocks} blocks of {LLAMA_8B_BLOCK_BYTES >> 20} MiB (one Llama-3-8B block: 16 tokens, "
          f"32 layers), {size >> 20} MiB each way: staged in DRAM in {staged:.2f} s, on disk after {written:.2f} s "
          f"({size / written / 1e9:.2f} GB/s)")
    print(f"[store] throughput: loaded from the files by a fresh store in {read:.2f} s ({size / read / 1e9:.2f} GB/s; "
          f"just written, so the OS page cache likely served them) {'bit-exact' if exact else 'WITH ERRORS'}")
    return exact


def demo_gsa(context: int = 4000, ratio: float = 0.3) -> bool:
    """One GSA decode step on the GPU when there is one (the Triton kernels), else on the CPU (the torch backend);
    the inputs are drawn on the CPU either way, so both see the same needles."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    num_blocks = -(-context // BLOCK)
    kv = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).bfloat16()
    q = torch.randn(1, Q_HEADS, HEAD_DIM, generator=gen).bfloat16()
    needles = torch.randperm(num_blocks - 8, generator=gen)[:3] + 2
    for block in needles.tolist():  # keys strongly aligned with every query head of the group
        kv[0, block, 5] = (q[0].view(KV_HEADS, -1, HEAD_DIM).float().mean(1) * 12).bfloat16()
    kv, q = kv.to(device), q.to(device)
    table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    seq_lens = torch.tensor([context], dtype=torch.int32, device=device)
    config = GSAConfig(sparse_ratio=ratio, init_window_sz=1, local_window_sz=4, min_blocks=8)
    backend = ops.resolve_backend("auto", q)
    reprs = ops.empty_reprs(num_blocks, KV_HEADS, HEAD_DIM, kv.dtype, config, device)
    ops.update_reprs(backend, kv[0], torch.arange(context // BLOCK, device=device), reprs)
    start = time.perf_counter()
    selection = ops.select(backend, q, reprs, table, seq_lens, config, BLOCK)
    sparse = ops.attend(backend, q, kv[0], kv[1], table, seq_lens, selection, None)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    dense = ops.attend(backend, q, kv[0], kv[1], table, seq_lens, None, None)
    sel_idx, sel_count = selection.sel_idx, selection.sel_count
    error = float((sparse.float() - dense.float()).norm() / dense.float().norm())
    chosen = [set(sel_idx[0, h, :sel_count[0, h]].tolist()) for h in range(KV_HEADS)]
    found = all(set(needles.tolist()) <= c for c in chosen)
    print(f"[gsa] context {context} tokens ({num_blocks} blocks) on {device}, sparse_ratio {ratio}: attended "
          f"{int(sel_count[0, 0])} blocks per KV head; needles {sorted(needles.tolist())} "
          f"{'all selected' if found else 'MISSED'}; output error vs dense {error:.2e} ({elapsed * 1e3:.0f} ms)")
    return found and error < 0.1


def print_monitor() -> None:
    """The process's StatsMonitor figures, each followed by what it counted."""
    stats = StatsMonitor.get_instance().get_stats()
    print(f"命中率 (hit rate): {stats['hit_rate'] * 100:.1f}%  ({stats['hits']} of {stats['lookups']} looked-up "
          "blocks found)")
    print(f"加载速度 (load speed): {stats['load_speed'] / 1e9:.2f} GB/s  ({stats['load_bytes'] / 2**20:.1f} MiB in "
          f"{stats['load_blocks']} blocks over {stats['load_seconds']:.2f} s of load busy time: file reads, CRC "
          "checks, copies)")
    print(f"保存速度 (save speed): {stats['save_speed'] / 1e9:.2f} GB/s  ({stats['save_bytes'] / 2**20:.1f} MiB in "
          f"{stats['save_blocks']} blocks over {stats['save_seconds']:.2f} s: copies into the DRAM tier; the "
          "write-down to disk runs behind them, see 'on disk after' above)")
