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
    assert "throughput: 128 blocks of 2 MiB" in done.stdout and "256 MiB each way" in done.stdout
    assert done.stdout.count("bit-exact") == 2
    # hits and lookups in blocks: 40 of request B's 48, then all 128 throughput blocks
    assert "命中率 (hit rate): 95.5%  (168 of 176 looked-up blocks found)" in done.stdout
    assert "加载速度 (load speed)" in done.stdout and "MiB in 168 blocks" in done.stdout
    assert "保存速度 (save speed)" in done.stdout and "MiB in 176 blocks" in done.stdout
    assert block_files(tmp_path / "demo" / "store")
    assert not (tmp_path / "demo" / "throughput").exists()  # its 256 MiB of files are removed
