"""Importing the packages changes nothing in the process's environment (a fresh interpreter without
TRITON_INTERPRET: the kernels' interpreter switch is the caller's, tests set it in conftest.py)."""
import os
import subprocess
import sys

SCRIPT = """
import os, torch, triton, numba  # what the packages import: their own settings are theirs
import transformers.integrations.sdpa_attention, transformers.masking_utils  # sets TORCHINDUCTOR_CACHE_DIR
before = dict(os.environ)
import ucm, ucm.cli, ucm_kernels, ucm_kernels.block_mass, ucm_kernels.block_select, ucm_kernels.kv_transfer
import ucm_kernels.sparse_decode, ucm_store, ucm_store.factory, ucm_sparse, ucm_sparse.hf, ucm_sparse.demo
changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
print("CHANGED", sorted(changed))
"""


def test_importing_the_packages_changes_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CHANGED []" in done.stdout, done.stdout
