"""The kernels of the GPU hot paths compiled for an H100/H200 (sm_90) on this CPU machine, without a GPU: block
selection (score, top-k), decode attention (split, combine), block summaries (by id, by table ranges), block mass
(the two-stage selection), the offload mode's residency (probe, victim search, assign, tokens, row copy), selection
reuse's per-step bookkeeping and the connector's KV block copy.

The Triton interpreter runs kernels as Python, so it accepts code Triton's compiler refuses (a variable first
assigned inside a ``range`` loop and read after it, for one) and says nothing of registers. These tests compile
each kernel at the launch settings a GPU would use, in a child Python without the interpreter (this process
imported the kernels interpreted), specialised as Triton's JIT specialises a launch, with Triton's own ptxas, and
read ptxas' report: each must compile and spill nothing. (Registers at 70e6076: the planned top-k 180, one-chunk
rows 115, chunks of 2048 / 4096 / 8192 231 / 221 / 235; the decode split kernel 96 dense, 120-156 on lists. At
d97f1a2: the score kernel 168 (Quest or gauss over bf16 summaries), 128 (Quest over fp8); the combine 48 / 112 at
17 / 64 splits; residency probe 40, age histogram 64, victim ranks 128, assign 162, tokens 24, row copy 28; the KV
block copy 48 gather / 52 scatter; block summaries 32 / 48 by id, 48 / 64 by ranges (bf16 / fp8); block_lse2 80.)
Where a kernel's pointer parameters are not named ``*_ptr``, the test names each one's type.
"""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pointer parameters by element type (Triton signature strings); every other pointer is int32, other ints int32
SELECT_TYPES = {"scores_ptr": "*fp32", "sel_rows_ptr": "*i64", "ratio_fixed": "i64"}
LOADS_WHEN_READY = {"_sparse_decode_split_kernel"}  # its READY launch reads its inputs before the PDL wait
DECODE_TYPES = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
                "acc_ptr": "*fp32", "stats_ptr": "*fp32", "sel_rows_ptr": "*i64", "qk_scale_log2": "fp32"}


def ptxas_report(module: str, name: str, types: dict, ints: dict, constexprs: dict, options: dict, workdir: str
                 ) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of kernel ``module.name`` compiled for sm_90 (run where Triton
    compiles, not interprets), specialised as Triton's JIT would for a launch with 16-byte aligned tensors and
    the int arguments ``ints`` (an int of 1 becomes a constant, a multiple of 16 is marked so; the others, and
    the kernel's do_not_specialize ones, are plain). A constexpr given as ``"tl.<dtype>"`` is that Triton dtype.
    Kernels of a decode step take ``PDL=1`` as the Launcher sets it on sm_90; their PTX must then wait in
    ``griddepcontrol.wait``."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), name)
    missing = [p.name for p in kernel.params if p.is_constexpr and not p.has_default and p.name not in constexprs]
    assert not missing, f"{name}: constexprs {missing} not given (they would compile as int arguments)"
    constexprs = {key: getattr(tl, value[3:]) if isinstance(value, str) and value.startswith("tl.") else value
                  for key, value in constexprs.items()}
    plain = set(kernel.do_not_specialize)
    constexprs.update({arg: 1 for arg, value in ints.items() if value == 1 and arg not in plain})
    signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "*i32" if arg.endswith("_ptr") else "i32")
                 for arg in kernel.arg_names}
    aligned = [arg for arg in kernel.arg_names if arg not in constexprs and arg not in plain
               and (signature[arg].startswith("*") or ints.get(arg, 1) % 16 == 0)]
    source = ASTSource(kernel, signature,
                       constexprs={(kernel.arg_names.index(arg),): value for arg, value in constexprs.items()},
                       attrs={(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = os.path.join(workdir, "kernel.ptx")
    with open(ptx, "w") as handle:
        handle.write(compiled.asm["ptx"])
    if constexprs.get("PDL"):  # launched with programmatic dependent launch: it waits for the kernel before it
        early_loads = bool(constexprs.get("READY")) and name in LOADS_WHEN_READY
        assert_waits_before_memory(compiled.asm["ptx"], name, early_loads)
    report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(workdir, "k.cubin")],
                            capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


def assert_waits_before_memory(ptx: str, name: str, early_loads: bool = False) -> None:
    """A kernel launched with PDL must wait in ``griddepcontrol.wait`` before its first global load, store, atomic
    or asynchronous copy (anything earlier may race the kernel before it); with ``early_loads`` (inputs the caller
    promised ready) only loads and L2 prefetches come first, and they do."""
    body = ptx[ptx.index(".entry"):]
    early = r"st\.global|atom\.global|red\.global|cp\.async" if early_loads else \
        r"ld\.global|st\.global|atom\.global|red\.global|cp\.async|prefetch"
    memory = re.search(rf"\b({early})", body)
    assert "griddepcontrol.wait" in body, f"{name}: PDL compiled without griddepcontrol.wait"
    assert memory is None or body.index("griddepcontrol.wait") < memory.start(), \
        f"{name}: {memory.group(1)} before griddepcontrol.wait"
    if early_loads:  # the point of loading early: the first tile's K/V rows asked of L2 while the kernel ahead ends
        assert "prefetch.global.L2" in body[:body.index("griddepcontrol.wait")], f"{name}: no L2 prefetch before wait"


def assert_no_spills(tmp_path, *args) -> None:
    """:func:`compiled_in_child` of ``args``, which must spill nothing."""
    registers, spills = compiled_in_child(tmp_path, *args)
    assert spills == 0, f"{registers} registers, {spills} bytes of spills"


def compiled_in_child(tmp_path, *args) -> tuple[int, int]:
    """:func:`ptxas_report` of ``args`` in a child Python without TRITON_INTERPRET."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__, json.dumps([*args, str(tmp_path)])], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-3000:]
    return tuple(json.loads(child.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("chunk,n_chunks,shares,flags", [
    (1024, 8, 0, False),  # a 128K-token table, as planned
    (1024, 8, 0, True),  # kept rows (reselect, sel_rows)
    (1024, 9, 0, False),  # 8195 blocks
    (1024, 1, 0, False),  # a table of one chunk: the search counts from registers
    (2048, 4, 0, False), (4096, 2, 0, False), (8192, 1, 0, False),  # select_anatomy's larger chunks
    (1024, 8, 4, False),  # the gauss rule, a group of 4
])
def test_top_k_compiles_for_sm90_without_spills(chunk, n_chunks, shares, flags, tmp_path):
    from ucm_kernels._utils import next_pow2
    from ucm_kernels.block_select import triton as block_select_triton

    constexprs = dict(BLOCK_SIZE=16, CHUNK=chunk, N_CHUNKS=n_chunks,
                      SCAN=chunk * min(block_select_triton._SCAN_CHUNKS, next_pow2(n_chunks)),
                      FINISH=min(chunk, block_select_triton._SELECT_FINISH), MASKED=flags, SEL_ROWS=flags,
                      SHARES=shares, SHARES_POW2=max(shares, 1), PDL=1)
    heads, width, row = 8, 2458, n_chunks * chunk + min(chunk, block_select_triton._SELECT_FINISH)
    ints = dict(max_blocks=8192, width=width, stride_sb=heads * 8192, stride_s_head=8192, stride_sh=8192,
                stride_kb=heads * row, stride_kh=row, stride_ib=heads * width, stride_ih=width, stride_ij=1,
                stride_cb=heads, stride_ch=1)
    assert_no_spills(tmp_path, "ucm_kernels.block_select.triton", "_select_kernel",
                     SELECT_TYPES, ints, constexprs, {"num_warps": 8})


@pytest.mark.parametrize("flags", [False, True])
def test_sliced_top_k_compiles_for_sm90_without_spills(flags, tmp_path):
    """The sliced top-k at 1 x 128K and a 2048-token budget (lists of 128 blocks, 9
    slices of 1024 blocks keeping 128 each), plain and for kept rows (reselect, sel_rows)."""
    from ucm_kernels.block_select import sliced

    heads, keep, slices, width = 8, 128, 9, 128
    limits = dict(max_blocks=8198, ratio_fixed=0, k_floor=128, init_window=1, local_window=4)
    cand = dict(stride_cb=heads * slices * 2 * keep, stride_ch=slices * 2 * keep, stride_cs=2 * keep,
                stride_nb=heads * slices, stride_nh=slices)
    assert_no_spills(tmp_path, "ucm_kernels.block_select.sliced", "_sliced_topk_kernel",
                     {"scores_ptr": "*fp32", "sel_rows_ptr": "*i64"},
                     dict(limits, width=width, slices=slices, stride_sb=heads * 8208, stride_sh=8208, stride_ab=heads,
                          stride_ib=heads * width, stride_ih=width, stride_ij=1, stride_ob=heads, stride_oh=1, **cand),
                     dict(BLOCK_SIZE=16, SLICE=sliced.SLICE, KEEP=keep, KEYS=16 * keep, SCAN=4 * keep, MASKED=flags,
                          SEL_ROWS=flags, PDL=1), {"num_warps": sliced._WARPS})


@pytest.mark.parametrize("max_blocks,flags", [(8192, False), (8192, True), (4097, False), (4096, True),
                                              (2048, False)])
def test_radix_top_k_compiles_for_sm90_without_spills(max_blocks, flags, tmp_path):
    """The radix top-k at sparse_ratio 0.3 over the tables it is planned for: 1 x 128K (8 slices of 1024 blocks),
    plain and for kept rows (reselect, sel_rows), 4097 blocks (5 slices), 1 x 32K (rows of 2048 keys), and rows of
    4096 keys as the A/B (bench/radix_topk_ab.py) runs them at 1 x 64K; each with its rows cut for short requests."""
    from ucm_kernels._utils import next_pow2
    from ucm_kernels.block_select import radix

    heads, width, row = 8, 2460, next_pow2(max_blocks)
    cut_1, cut_2, cut_3 = radix.cut_rows(row)
    slice_blocks = max(radix.MIN_SLICE, next_pow2(-(-max_blocks // radix.SLICES)))
    ints = dict(max_blocks=max_blocks, width=width, ratio_fixed=1288490188, k_floor=5, init_window=1, local_window=4,
                stride_sb=heads * 16384, stride_sh=16384, stride_ib=heads * width, stride_ih=width, stride_ij=1,
                stride_ob=heads, stride_oh=1)
    assert_no_spills(tmp_path, "ucm_kernels.block_select.radix", "_radix_topk_kernel", SELECT_TYPES, ints,
                     dict(BLOCK_SIZE=16, SLICE=slice_blocks, ROW=row, CUT_1=cut_1, CUT_2=cut_2, CUT_3=cut_3,
                          MASKED=flags, SEL_ROWS=flags, PDL=1),
                     {"num_warps": radix.num_warps(row)})


@pytest.mark.parametrize("dense,direct,split_tokens,ready", [
    (True, False, 16384, False),  # dense 128K over several splits
    (False, False, 8192, False),  # a long list (5 stages)
    (False, False, 1024, False),  # a short list (3 stages)
    (False, True, 1024, False),  # one split writing the output itself
    (False, False, 1024, True),  # inputs ready: the first tile's rows asked of L2 before the PDL wait
    (True, False, 16384, True),
])
def test_decode_split_kernel_compiles_for_sm90_without_spills(dense, direct, split_tokens, ready, tmp_path):
    """Llama-8B-like heads (group 4, head_dim 128, bf16, block 16, 8 x 128K tables) at :func:`_choose_tile`'s
    settings."""
    from ucm_kernels.sparse_decode.triton import _choose_tile

    tile_tokens, num_warps, num_stages = _choose_tile(split_tokens, dense)
    constexprs = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, DENSE=dense, DIRECT=direct,
                      COMPUTE_DTYPE="tl.bfloat16", TILE_TOKENS=tile_tokens, SEL_ROWS=False, READY=ready, PDL=1,
                      sel_rows_ptr=None)  # the tensors a launch passes as None are constexpr None, as in _launch
    if dense:
        constexprs.update(sel_idx_ptr=None, sel_count_ptr=None)
    if direct:
        constexprs.update(acc_ptr=None, stats_ptr=None)
    width = 0 if dense else 2458  # the lists of 0.3 x 8192 blocks
    ints = dict(stride_qb=32 * 128, stride_qh=128, stride_qd=1, stride_kb=16 * 8 * 128, stride_kt=8 * 128,
                stride_kh=128, stride_kd=1, stride_vb=16 * 8 * 128, stride_vt=8 * 128, stride_vh=128, stride_vd=1,
                stride_btb=8192, stride_btj=1, stride_sib=8 * width, stride_sih=width, stride_sij=0 if dense else 1,
                stride_scb=0 if dense else 8, stride_sch=0 if dense else 1, stride_ob=32 * 128, stride_oh=128,
                stride_od=1, num_kv_heads=8)
    assert_no_spills(tmp_path, "ucm_kernels.sparse_decode.triton", "_sparse_decode_split_kernel",
                     DECODE_TYPES, ints, constexprs,
                     {"num_warps": num_warps, "num_stages": num_stages})


def test_residency_assign_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The offload mode's assign launch (slot maps, the attention table, and the admitted rows copied from pinned
    host memory: 8 KiB pieces as 1024 int64 words) as ``admit_selection`` launches it."""
    int64 = ("pieces", "miss_rank", "slots", "victims", "slot_of", "piece_in", "stamp", "fetch_pieces", "fetch_slots",
             "tally", "src", "dst")
    types = {**{name: "*i64" for name in int64}, "counters": "*i32", "sel_idx": "*i32", "table": "*i32"}
    constexprs = dict(WRITE_TABLE=True, HAS_TALLY=True, COPY=True, ROW_WORDS=1024, BLOCK=1024, TILE=1024, PDL=1)
    ints = dict(n=4 * 8 * 2458, stamp_value=100, max_new=4 * 8 * 2458, width=2458, sel_stride=2464, table_stride=8192)
    assert_no_spills(tmp_path, "ucm_kernels.residency.triton", "_assign_kernel", types, ints,
                     constexprs, {"num_warps": 4})


@pytest.mark.parametrize("score,reprs,masked", [
    ("quest", "*bf16", False),  # Quest over bf16 summaries (repr_dtype "cache")
    ("quest", "*fp8e4nv", False),  # Quest over fp8 summaries, scaled by kscale
    ("gauss", "*bf16", False),  # the gauss rule's log masses, one row per query head (group 4)
    ("quest", "*bf16", True),  # reuse (select_every > 1): only the rows of reselect
])
def test_score_kernel_compiles_for_sm90_without_spills(score, reprs, masked, tmp_path):
    """The score launch of ``SelectPlan.run`` (``_launch``) at 8 x 128K tokens (8192-block tables, sparse_ratio
    0.3, windows 1 / 4, min_blocks 8), 8 KV heads of 128, 32 query heads, at :func:`_choose_score_launch`'s
    settings."""
    from ucm_kernels._utils import next_pow2
    from ucm_kernels.block_select.triton import SCORES, _choose_score_launch, _plan_args

    tile, num_warps = _choose_score_launch(8, 128)
    scaled, group = reprs == "*fp8e4nv", 4
    rows = 8 * (group if score == "gauss" else 1)  # the score scratch's rows per request
    types = {"q_ptr": "*bf16", "kmin_ptr": reprs, "kmax_ptr": reprs, "kmean_ptr": reprs, "kscale_ptr": "*fp32",
             "scores_ptr": "*fp32", "sm_scale": "fp32"}
    constexprs = dict(BLOCK_SIZE=16, HEADS=8, HEADS_PAD=8, GROUP=group, BLOCK_G=next_pow2(group), HEAD_DIM=128,
                      BLOCK_D=128, RULE=SCORES.index(score), TILE=tile, SCALED=scaled, MASKED=masked, PDL=1)
    ints = dict(**_plan_args(8192, 16, 0.3, 1, 4, 8, None), stride_qb=32 * 128, stride_qh=128, stride_qd=1,
                stride_rb=8 * 128, stride_rh=128, stride_rd=1, stride_kscale_b=8 if scaled else 0,
                stride_kscale_h=1 if scaled else 0, stride_tb=8192, stride_tj=1, stride_sb=rows * 8192,
                stride_sh=8192)
    assert_no_spills(tmp_path, "ucm_kernels.block_select.triton", "_score_kernel", types, ints,
                     constexprs, {"num_warps": num_warps})


def test_combine_splits_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The decode's combine launch (``_launch`` with several splits): one program per (request, query head) of
    32 heads of 128, bf16 output, Triton's default warps and stages; one compile for every split count (17: lists
    of 8 x 128K at ratio 0.3 on an H100, 8 programs an SM over 64 (request, KV head) rows)."""
    from ucm_kernels.sparse_decode.triton import _SPLITS_TILE

    types = {"acc_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": "*bf16"}
    constexprs = dict(HEAD_DIM=128, SPLITS_TILE=_SPLITS_TILE, READY=True, PDL=1)
    ints = dict(stride_ob=32 * 128, stride_oh=128, stride_od=1, num_q_heads=32, num_splits=17)
    assert_no_spills(tmp_path, "ucm_kernels.sparse_decode.triton", "_combine_splits_kernel",
                     types, ints, constexprs, {})


# the residency kernels' parameters (not named *_ptr) as the offload mode passes them: int64 pieces, slots, stamps
# and scratch, bool pinned / wanted, int32 counters, selections and tables, the pool's bf16 KV
RESIDENCY_TYPES = {**{name: "*i64" for name in (
    "pieces", "slot_of", "stamp", "slots", "miss_rank", "tally", "token_pieces", "token_offsets", "token_slots",
    "victims", "offsets", "src", "dst", "src_idx", "dst_idx")},
    **{name: "*u1" for name in ("pinned", "wanted")}, **{name: "*bf16" for name in ("kv", "key", "value")},
    **{name: "*i32" for name in ("counters", "sel_idx", "sel_count", "block_table", "hists", "prefix", "count")}}
POOL_SLOTS = 4096 * 8  # gpu_budget_blocks' default 4096 blocks of 8 KV heads


@pytest.mark.parametrize("selection", [
    True,  # admit_selection: the selection's pieces, the batch's decode tokens written by extra programs
    False,  # admit: given pieces (the newest blocks, the prefetch's predictions); no tokens
])
def test_residency_probe_kernel_compiles_for_sm90_without_spills(selection, tmp_path):
    """The first launch of the offload mode's ``admit_selection`` (8 x 8 lists of 2458 blocks over 8192-block
    host tables, tally, a token of head_dim 128 per piece into the bf16 pool) or ``admit`` (pieces and wanted
    given, tally), as ``residency._launch`` launches it."""
    n = 8 * 8 * 2458
    types = dict(RESIDENCY_TYPES)
    if selection:  # the launcher passes counters (int32) for what is not given
        types.update(wanted="*i32")
    else:  # ... and pieces as sel_idx
        types.update(sel_idx="*i64", **{name: "*i32" for name in ("kv", "token_pieces", "token_offsets", "key",
                                                                  "value")})
    token = dict(BLOCK_SIZE=16, HEAD_DIM=128, DIM_POW2=128) if selection else dict(BLOCK_SIZE=1, HEAD_DIM=1,
                                                                                    DIM_POW2=1)
    constexprs = dict(FROM_SELECTION=selection, HAS_TALLY=True, WRITE_TOKENS=selection, TILE=1024, PDL=1, **token)
    ints = dict(n=n, stamp_value=100, width=2458 if selection else n, sel_stride=2464 if selection else 0,
                table_stride=8192 if selection else 6,
                heads=8 if selection else 1, probe_programs=-(-n // 1024))
    assert_no_spills(tmp_path, "ucm_kernels.residency.triton", "_probe_kernel", types, ints,
                     constexprs, {"num_warps": 8})


@pytest.mark.parametrize("name", ["_age_histogram_kernel", "_rank_victims_kernel"])
def test_residency_victim_kernels_compile_for_sm90_without_spills(name, tmp_path):
    """The victim search of ``admit`` / ``admit_selection`` over the default pool (32768 slots, 8 tiles of
    4096), as ``residency._launch`` launches it (8 warps)."""
    from ucm_kernels.residency import triton as residency_triton

    constexprs = dict(AGE_CAP=residency_triton.AGE_CAP, SLOT_TILE=residency_triton._SLOT_TILE, PDL=1)
    ints = dict(capacity=POOL_SLOTS, below=100, max_new=8 * 8 * 2458)
    if name == "_age_histogram_kernel":
        constexprs.update(BINS=residency_triton._BINS, PREFIX_ROWS=residency_triton._PREFIX_ROWS)
        ints.update(tiles=POOL_SLOTS // residency_triton._SLOT_TILE)
    assert_no_spills(tmp_path, "ucm_kernels.residency.triton", name, RESIDENCY_TYPES, ints,
                     constexprs, {"num_warps": 8})


def test_residency_write_tokens_kernel_compiles_for_sm90_without_spills(tmp_path):
    """``write_tokens`` (``HotPool.write_tokens``): a decode token of head_dim 128 into each newest piece of the
    bf16 pool (block 16), Triton's default warps."""
    constexprs = dict(BLOCK_SIZE=16, HEAD_DIM=128, DIM_POW2=128, PDL=1)
    assert_no_spills(tmp_path, "ucm_kernels.residency.triton", "_write_tokens_kernel",
                     RESIDENCY_TYPES, dict(stamp_value=100), constexprs, {})


def test_residency_copy_rows_kernel_compiles_for_sm90_without_spills(tmp_path):
    """``copy_rows`` (``HotPool.fetch`` / ``copy``): 8 KiB pieces (K and V of 16 tokens x 128 bf16) as 1024 int64
    words, Triton's default warps."""
    assert_no_spills(tmp_path, "ucm_kernels.residency.triton", "_copy_rows_kernel",
                     RESIDENCY_TYPES, {}, dict(ROW_WORDS=1024, BLOCK=1024, PDL=1), {})


def test_reuse_step_kernel_compiles_for_sm90_without_spills(tmp_path):
    """Selection reuse's per-step bookkeeping (``ReuseBook.step`` on a GPU): int32 lengths and table, int64 slots,
    Triton's default warps."""
    types = {"seq_lens": "*i32", "block_table": "*i32", "slots": "*i64", **{name: "*i32" for name in (
        "seq_len_state", "tail_state", "age_state", "reselect")}}
    ints = dict(n=256, stride_tb=8192, stride_tj=1, table_width=8192, block_size=16, every=4, num_slots=1024,
                same_width=1)
    assert_no_spills(tmp_path, "ucm_kernels.reuse_step.triton", "_reuse_step_kernel", types, ints,
                     dict(ROWS=128, PDL=1), {})


def test_query_drift_kernel_compiles_for_sm90_without_spills(tmp_path):
    """Selection reuse's drift rule (``SelectionStore.drifted`` on a GPU): a row's 32 bf16 query heads of 128 and
    its slot's kept ones, Triton's default warps."""
    types = {"q": "*bf16", "kept_q": "*bf16", "slots": "*i64", "reselect": "*i32", "fresh": "*i32",
             "threshold": "fp32"}
    ints = dict(num_heads=32, head_dim=128, stride_qn=4096, stride_qh=128, stride_kn=4096, stride_kh=128)
    assert_no_spills(tmp_path, "ucm_kernels.query_drift.triton", "_query_drift_kernel", types, ints,
                     dict(NORM_FLOOR=1e-30, BLOCK_H=32, BLOCK_D=128, PDL=1), {})


@pytest.mark.parametrize("to_staging", [True, False])
def test_kv_block_copy_kernel_compiles_for_sm90_without_spills(to_staging, tmp_path):
    """The connector's saves (``gather_blocks_into_rows``, to_staging) and Cache-tier loads
    (``scatter_blocks_from_rows``) as ``_copy_blocks`` launches them: 32 layers of vLLM's FlashAttention cache
    (one 64 KiB run a block and layer: 16 tokens x 8 heads x K and V of 128 bf16) of 65536 blocks, 8-byte words,
    int64 block ids, rows by address (pinned buffers)."""
    from ucm_kernels.kv_transfer import triton as kv_transfer_triton

    segment_words = (64 << 10) // 8
    types = {"layer_addrs": "*i64", "block_ids": "*i64", "staging": "*i64"}
    constexprs = dict(NUM_SEGMENTS=1, SEGMENT_WORDS=segment_words,
                      BLOCK=min(segment_words, kv_transfer_triton._STEP_BYTES // 8), ALIGN=16, TO_STAGING=to_staging,
                      ROW_TABLE=True, WORD="tl.int64")
    ints = dict(block_stride=segment_words, segment_stride=0, num_layers=32)
    assert_no_spills(tmp_path, "ucm_kernels.kv_transfer.triton", "_kv_block_copy_kernel", types,
                     ints, constexprs, {"num_warps": kv_transfer_triton._NUM_WARPS})


@pytest.mark.parametrize("name", ["_block_repr_kernel", "_block_repr_ranges_kernel"])
@pytest.mark.parametrize("reprs", ["*bf16", "*fp8e4nv"])
def test_block_repr_kernels_compile_for_sm90_without_spills(name, reprs, tmp_path):
    """``update_block_repr`` (GSA's filled blocks by id, int32) and ``update_block_repr_ranges`` (vLLM's
    ``FlashGSA.run``, each row's range of its int32 block table: 8 rows of 8192 blocks) of a bf16 cache of 65536
    blocks (the strides of vLLM's FlashAttention view, K and V interleaved; other caches' strides, multiples of 16
    too, specialise alike) into bf16 or fp8 summaries of 8 heads x 128, Triton's default warps and stages."""
    scaled = reprs == "*fp8e4nv"
    types = {"key_ptr": "*bf16", "kmin_ptr": reprs, "kmax_ptr": reprs, "kmean_ptr": reprs,
             "kscale_ptr": "*fp32" if scaled else reprs}  # the launcher passes kmin when there is no kscale
    constexprs = dict(BLOCK_SIZE=16, BLOCK_T=16, HEAD_DIM=128, BLOCK_D=128, SCALED=scaled, PDL=1)
    ints = dict(num_blocks=65536, stride_kb=16 * 8 * 256, stride_kt=8 * 256, stride_kh=256, stride_kd=1,
                stride_rb=8 * 128, stride_rh=128, stride_rd=1, stride_sb=8 if scaled else 0,
                stride_sh=1 if scaled else 0)
    if name == "_block_repr_ranges_kernel":
        ints.update(num_rows=8, max_blocks=8192, stride_btr=8192, stride_btj=1)
    assert_no_spills(tmp_path, "ucm_kernels.block_repr.triton", name, types, ints, constexprs,
                     {})


def test_block_lse2_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The two-stage selection's ``block_lse2`` (``FlashGSA`` with rerank_candidates 3: 8 x 8 lists of 7373
    candidates, sparse_ratio 0.9, over 8192-block tables) at group 4, head_dim 128, bf16 vLLM FlashAttention keys,
    as its launcher launches it (4 blocks of 16 a step, 4 warps, Triton's default stages)."""
    width, chunk = 7373, 32
    types = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "out_ptr": "*fp32", "qk_scale_log2": "fp32"}
    constexprs = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, BLOCKS_PER_TILE=4,
                      COMPUTE_DTYPE="tl.bfloat16", MASKED=False, PDL=1)
    ints = dict(stride_qb=32 * 128, stride_qh=128, stride_qd=1, stride_kb=16 * 8 * 256, stride_kt=8 * 256,
                stride_kh=256, stride_kd=1, stride_btb=8192, stride_btj=1, stride_sib=8 * width, stride_sih=width,
                stride_sij=1, stride_scb=8, stride_sch=1, stride_ob=8 * 4 * width, stride_oh=4 * width,
                stride_og=width, stride_oj=1, num_kv_heads=8, width=width, chunk=chunk)
    assert_no_spills(tmp_path, "ucm_kernels.block_mass.triton", "_block_lse2_kernel", types,
                     ints, constexprs, {"num_warps": 4})


if __name__ == "__main__":
    print(json.dumps(ptxas_report(*json.loads(sys.argv[1]))))
