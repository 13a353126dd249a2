"""The top-k, decode and residency-assign kernels compiled for an H100/H200 (sm_90) on this CPU machine, without a
GPU.

The Triton interpreter runs kernels as Python, so it accepts code Triton's compiler refuses (a variable first
assigned inside a ``range`` loop and read after it, for one) and says nothing of registers. These tests compile
each kernel at the launch settings a GPU would use, in a child Python without the interpreter (this process
imported the kernels interpreted), specialised as Triton's JIT specialises a launch, with Triton's own ptxas, and
read ptxas' report: each must compile and spill nothing. (Registers at 70e6076: the planned top-k 180, one-chunk
rows 115, chunks of 2048 / 4096 / 8192 231 / 221 / 235; the decode split kernel 96 dense, 120-156 on lists.)
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
DECODE_TYPES = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "out_ptr": "*bf16",
                "acc_ptr": "*fp32", "stats_ptr": "*fp32", "sel_rows_ptr": "*i64", "qk_scale_log2": "fp32"}


def ptxas_report(module: str, name: str, types: dict, ints: dict, constexprs: dict, options: dict, workdir: str
                 ) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of kernel ``module.name`` compiled for sm_90 (run where Triton
    compiles, not interprets), specialised as Triton's JIT would for a launch with 16-byte aligned tensors and
    the int arguments ``ints`` (an int of 1 becomes a constant, a multiple of 16 is marked so; the others, and
    the kernel's do_not_specialize ones, are plain). A constexpr given as ``"tl.<dtype>"`` is that Triton dtype."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(module), name)
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
    report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(workdir, "k.cubin")],
                            capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


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
                      SHARES=shares, SHARES_POW2=max(shares, 1))
    heads, width, row = 8, 2458, n_chunks * chunk + min(chunk, block_select_triton._SELECT_FINISH)
    ints = dict(max_blocks=8192, width=width, stride_sb=heads * 8192, stride_s_head=8192, stride_sh=8192,
                stride_kb=heads * row, stride_kh=row, stride_ib=heads * width, stride_ih=width, stride_ij=1,
                stride_cb=heads, stride_ch=1)
    registers, spills = compiled_in_child(tmp_path, "ucm_kernels.block_select.triton", "_select_kernel",
                                          SELECT_TYPES, ints, constexprs, {"num_warps": 8})
    assert spills == 0, f"{registers} registers, {spills} bytes of spills"


@pytest.mark.parametrize("dense,direct,split_tokens", [
    (True, False, 16384),  # dense 128K over several splits
    (False, False, 8192),  # a long list (5 stages)
    (False, False, 1024),  # a short list (3 stages)
    (False, True, 1024),  # one split writing the output itself
])
def test_decode_split_kernel_compiles_for_sm90_without_spills(dense, direct, split_tokens, tmp_path):
    """Llama-8B-like heads (group 4, head_dim 128, bf16, block 16, 8 x 128K tables) at :func:`_choose_tile`'s
    settings."""
    from ucm_kernels.sparse_decode.triton import _choose_tile

    tile_tokens, num_warps, num_stages = _choose_tile(split_tokens, dense)
    constexprs = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, DENSE=dense, DIRECT=direct,
                      COMPUTE_DTYPE="tl.bfloat16", TILE_TOKENS=tile_tokens, SEL_ROWS=False)
    width = 0 if dense else 2458  # the lists of 0.3 x 8192 blocks
    ints = dict(stride_qb=32 * 128, stride_qh=128, stride_qd=1, stride_kb=16 * 8 * 128, stride_kt=8 * 128,
                stride_kh=128, stride_kd=1, stride_vb=16 * 8 * 128, stride_vt=8 * 128, stride_vh=128, stride_vd=1,
                stride_btb=8192, stride_btj=1, stride_sib=8 * width, stride_sih=width, stride_sij=0 if dense else 1,
                stride_scb=0 if dense else 8, stride_sch=0 if dense else 1, stride_ob=32 * 128, stride_oh=128,
                stride_od=1, num_kv_heads=8)
    registers, spills = compiled_in_child(tmp_path, "ucm_kernels.sparse_decode.triton", "_sparse_decode_split_kernel",
                                          DECODE_TYPES, ints, constexprs,
                                          {"num_warps": num_warps, "num_stages": num_stages})
    assert spills == 0, f"{registers} registers, {spills} bytes of spills"


def test_residency_assign_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The offload mode's assign launch (slot maps, the attention table, and the admitted rows copied from pinned
    host memory: 8 KiB pieces as 1024 int64 words) as ``admit_selection`` launches it."""
    int64 = ("pieces", "miss_rank", "slots", "victims", "slot_of", "piece_in", "stamp", "fetch_pieces", "fetch_slots",
             "tally", "src", "dst")
    types = {**{name: "*i64" for name in int64}, "counters": "*i32", "sel_idx": "*i32", "table": "*i32"}
    constexprs = dict(WRITE_TABLE=True, HAS_TALLY=True, COPY=True, ROW_WORDS=1024, BLOCK=1024, TILE=1024)
    ints = dict(n=4 * 8 * 2458, stamp_value=100, max_new=4 * 8 * 2458, width=2458, table_width=8192)
    registers, spills = compiled_in_child(tmp_path, "ucm_kernels.residency.triton", "_assign_kernel", types, ints,
                                          constexprs, {"num_warps": 4})
    assert spills == 0, f"{registers} registers, {spills} bytes of spills"


if __name__ == "__main__":
    print(json.dumps(ptxas_report(*json.loads(sys.argv[1]))))
