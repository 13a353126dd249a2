"""One layer's decode kernels to read with Nsight Compute at batch 1 (1 x 128K).

``python -m bench.ncu_attend VARIANT`` builds ``bench_sparse_decode``'s 1 x 128K case and runs VARIANT WARMUP + 1
times: ``dense`` (our dense decode over every block), ``ratio0.3`` / ``budget2048`` (the attention over the Quest
lists of that selection) or ``select`` (the Quest selection at ratio 0.3: score and top-k launches), so ``ncu
--launch-skip WARMUP --launch-count 1 -k regex:<kernel>`` profiles the last launch of a kernel (``bench/run_gpu.sh
ncu`` runs them with the sections that tell memory throughput, occupancy and what the warps stall on).
"""
import sys

import torch

from bench.bench_sparse_decode import SELECTIONS, attend, build_case, dense, select

WARMUP = 3
VARIANTS = ("dense", *SELECTIONS, "select")


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else ""
    if variant not in VARIANTS:
        raise SystemExit(f"variant: got {variant!r}, expected one of {VARIANTS}")
    torch.manual_seed(0)
    case = build_case(1, 131072)
    out = torch.empty_like(case.q)
    lists = select(case, variant, "quest") if variant in SELECTIONS else None
    for _ in range(WARMUP + 1):
        if variant == "dense":
            dense(case, out)
        elif variant == "select":
            select(case, "ratio0.3", "quest")
        else:
            attend(case, variant, *lists, out)
    torch.cuda.synchronize()
    print(f"{variant}: {WARMUP + 1} launches")


if __name__ == "__main__":
    main()
