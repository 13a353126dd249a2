"""The README's main job (`ucm demo`) runs on CPU and every check inside it passes."""
import os
import subprocess
import sys

from ucm_store.backends.posix import block_files


def test_ucm_demo_runs_and_passes_its_checks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    done = subprocess.run([sys.executable, "-m", "ucm.cli", "demo", "--dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "40 of 48 prompt blocks hit" in done.stdout and "bit-exact" in done.stdout
    assert "needles" in done.stdout and "all selected" in done.stdout
    assert "命中率 (hit rate): 97.6%" in done.stdout
    assert block_files(tmp_path / "demo" / "store")
