"""The top-k kernel compiled for an H100/H200 (sm_90) on this CPU machine, without a GPU.

The Triton interpreter runs kernels as Python, so it accepts code Triton's compiler refuses (a variable first
assigned inside a ``range`` loop and read after it, for one) and says nothing of registers. These tests compile the
kernel at the launch settings a GPU would use, in a child Python without the interpreter (this process imported
the kernels interpreted), with Triton's own ptxas, and read ptxas' report: it must compile, and spill no more
than it did when the case was added (nothing, but for the 9-chunk row: ptxas holds that one to 128 registers and
spills 8 bytes, measured at 8db7498).
"""
import json
import os
import re
import subprocess
import sys

import pytest

SELECT_POINTERS = {"scores_ptr": "*fp32", "sel_rows_ptr": "*i64"}  # the others are int32 tensors
SELECT_INT64 = ("ratio_fixed",)  # sparse_ratio in 32-bit fixed point


def ptxas_report(constexprs: dict, num_warps: int, workdir: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of the top-k kernel compiled for sm_90 with these constexprs; run
    in a process where Triton compiles (not interprets)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from ucm_kernels.block_select.triton import _select_kernel as kernel

    signature = {name: "constexpr" if name in constexprs else SELECT_POINTERS.get(
        name, "*i32" if name.endswith("_ptr") else "i64" if name in SELECT_INT64 else "i32")
        for name in kernel.arg_names}
    source = ASTSource(kernel, signature,
                       constexprs={(kernel.arg_names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = os.path.join(workdir, "kernel.ptx")
    with open(ptx, "w") as handle:
        handle.write(compiled.asm["ptx"])
    report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(workdir, "k.cubin")],
                            capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return registers, spills


@pytest.mark.parametrize("chunk,n_chunks,shares,flags,spill_bytes", [
    (1024, 8, 0, False, 0),  # a 128K-token table, as planned
    (1024, 8, 0, True, 0),  # kept rows (reselect, sel_rows)
    (1024, 9, 0, False, 8),  # 8195 blocks
    (1024, 1, 0, False, 0),  # a table of one chunk: the search counts from registers
    (2048, 4, 0, False, 0), (4096, 2, 0, False, 0), (8192, 1, 0, False, 0),  # select_anatomy's larger chunks
    (1024, 8, 4, False, 0),  # the gauss rule, a group of 4
])
def test_top_k_compiles_for_sm90_within_its_spills(chunk, n_chunks, shares, flags, spill_bytes, tmp_path):
    from ucm_kernels.block_select import triton as block_select_triton
    from ucm_kernels._utils import next_pow2

    constexprs = dict(BLOCK_SIZE=16, CHUNK=chunk, N_CHUNKS=n_chunks,
                      SCAN=chunk * min(block_select_triton._SCAN_CHUNKS, next_pow2(n_chunks)),
                      FINISH=min(chunk, block_select_triton._SELECT_FINISH), MASKED=flags, SEL_ROWS=flags,
                      SHARES=shares, SHARES_POW2=max(shares, 1))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__, json.dumps(constexprs), str(tmp_path)], env=env,
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                               os.path.abspath(__file__)))))
    assert child.returncode == 0, child.stderr[-3000:]
    registers, spills = json.loads(child.stdout.strip().splitlines()[-1])
    assert spills <= spill_bytes, f"{registers} registers, {spills} bytes of spills (was {spill_bytes})"


if __name__ == "__main__":
    print(json.dumps(ptxas_report(json.loads(sys.argv[1]), 8, sys.argv[2])))
