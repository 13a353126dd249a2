"""One attention launch to read with Nsight Compute: why lists read HBM slower than dense decode at batch 1.

``python -m bench.ncu_attend VARIANT`` builds ``bench_sparse_decode``'s 1 x 128K case and launches the attention of
VARIANT (``dense``: our dense decode over every block; ``ratio0.3`` / ``budget2048``: the split kernel over the Quest
lists of that selection) WARMUP + 1 times, so ``ncu --launch-skip WARMUP --launch-count 1 -k
regex:_sparse_decode_split_kernel`` profiles the last launch (``bench/run_gpu.sh ncu`` runs the three with the
sections that tell memory throughput, occupancy and what the warps stall on).
"""
import sys

import torch

from bench.bench_sparse_decode import SELECTIONS, attend, build_case, dense, select

WARMUP = 3
VARIANTS = ("dense", *SELECTIONS)


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else ""
    if variant not in VARIANTS:
        raise SystemExit(f"variant: got {variant!r}, expected one of {VARIANTS}")
    torch.manual_seed(0)
    case = build_case(1, 131072)
    out = torch.empty_like(case.q)
    lists = None if variant == "dense" else select(case, variant, "quest")
    for _ in range(WARMUP + 1):
        if lists is None:
            dense(case, out)
        else:
            attend(case, variant, *lists, out)
    torch.cuda.synchronize()
    print(f"{variant}: {WARMUP + 1} launches")


if __name__ == "__main__":
    main()
