"""What the top-k launch's time is made of at batch 1: its fixed part against its threshold search, by row width.

One request, 8 KV heads (8 programs), sparse_ratio 0.3 or a 2048-token budget, ``select_from_scores`` over given fp32
scores captured in a CUDA graph (replay median, ``do_bench``). Scores either all equal (the search has nothing to do:
lowest == highest, so what is left is the launch, writing the keys and writing the lists) or normal random (the
whole search), at tables of 2K to 8K blocks and at chunk sizes (``_SELECT_CHUNK``) of CHUNKS entries; the
difference of the two is the search. Every variant's lists are checked against the planned chunk's first.

Usage, on the GPU: ``python -m bench.select_anatomy`` (JSON under $OUT or bench/results/); ``--smoke``: small
tables through the same code and checks on the CPU (tests/benchmarks). It only uses
``select_from_scores`` and ``_SELECT_CHUNK``, so the same file runs over an older tree for an A/B in one call.
"""
import sys
import time

import torch
from triton.testing import do_bench

from bench.bench_sparse_decode import graph_of
from bench.harness import measure_copy_ceilings, write_results
from ucm_kernels.block_select import select_from_scores
from ucm_kernels.block_select import triton as block_select_triton

HEADS = 8
BLOCKS = (2048, 8192, 8198)
CHUNKS = (1024, 2048, 4096, 8192)  # the planned chunk first (512 was slower but for one row, 2026-12-06);
# a row of one chunk is counted from registers
SETTINGS = {"ratio0.3": dict(sparse_ratio=0.3), "budget2048": dict(sparse_ratio=1.0, token_budget=2048)}
SIZES = dict(block_size=16, init_window=1, local_window=4, min_blocks=8)


def timed_lists(scores: torch.Tensor, seq_lens: torch.Tensor, chunk: int, setting: dict, timer) -> tuple[float, tuple]:
    """(microseconds by ``timer``, lists) of select_from_scores at this chunk size."""
    planned = block_select_triton._SELECT_CHUNK
    block_select_triton._SELECT_CHUNK = chunk
    try:
        lists = select_from_scores(scores, seq_lens, **SIZES, **setting)
        us = timer(lambda: select_from_scores(scores, seq_lens, **SIZES, **setting, out=lists))
    finally:
        block_select_triton._SELECT_CHUNK = planned
    return us, lists


def graph_replay_us(fn) -> float:
    """``fn`` captured in a CUDA graph: the replay's median in microseconds."""
    return do_bench(graph_of(fn).replay, warmup=25, rep=100, return_mode="median") * 1e3


def wall_us(fn) -> float:
    """One call's wall time in microseconds (the CPU smoke run: the interpreter's time means nothing, the checks do)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def rows_for(blocks: int, chunks: tuple, device: str = "cuda", timer=graph_replay_us) -> list[dict]:
    """Every (scores, setting, chunk) row of one request of ``blocks`` blocks; each chunk's lists checked against
    the first chunk's."""
    gen = torch.Generator(device=device).manual_seed(blocks)
    seq_lens = torch.tensor([blocks * 16], dtype=torch.int32, device=device)
    rows = []
    for dist in ("equal", "normal"):
        if dist == "equal":
            scores = torch.ones(1, HEADS, blocks, device=device)
        else:
            scores = torch.randn(1, HEADS, blocks, device=device, generator=gen)
        for name, setting in SETTINGS.items():
            expected = None
            for chunk in chunks:
                us, lists = timed_lists(scores, seq_lens, chunk, setting, timer)
                if expected is None:
                    expected = [t.clone() for t in lists]
                assert all(torch.equal(a, b) for a, b in zip(lists, expected)), (blocks, dist, name, chunk)
                row = {"blocks": blocks, "scores": dist, "setting": name, "chunk": chunk,
                       "planned": chunk == block_select_triton._SELECT_CHUNK, "replay_us": round(us, 2)}
                print(row, flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """The GPU run (JSON written), or with ``--smoke`` two small tables at chunks of 4 and 16 entries on the CPU
    (the Triton interpreter) through the same code and checks; returns the rows."""
    if argv is not None and "--smoke" in argv:
        return [row for blocks in (40, 60) for row in rows_for(blocks, (4, 16), "cpu", wall_us)]
    ceilings = measure_copy_ceilings()
    rows = [row for blocks in BLOCKS for row in rows_for(blocks, CHUNKS)]
    print(write_results("select_anatomy", rows, ceilings))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
