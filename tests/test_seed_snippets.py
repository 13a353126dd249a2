"""The seed's code samples run verbatim (copied unchanged into tests/seed_snippets/) in fresh processes."""
import subprocess
import sys
from pathlib import Path

SNIPPETS = Path(__file__).parent / "seed_snippets"


def run_snippet(name: str, prologue: str = "", epilogue: str = "", cwd: Path | None = None) -> str:
    """Run a seed snippet unchanged between an optional prologue and epilogue; return its stdout."""
    code = prologue + (SNIPPETS / name).read_text() + epilogue
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_section_2_3_pool_stats():
    out = run_snippet("section_2_3_pool_stats.py")
    assert "使用率: 0.0%" in out and "峰值: 0" in out


def test_section_7_2_monitor():
    out = run_snippet("section_7_2_monitor.py")
    assert "命中率: 0.0%" in out and "加载速度: 0.0 GB/s" in out and "WARNING: 命中率低于 50%" in out


def test_section_6_1_hit_rate_prints_0_then_100_of_1000():
    from ucm_store.pipeline import block_key

    blocks = Path("/data/ucm_cache") / "blocks"
    files = []
    for i in range(1000):
        key = block_key(f"test_block_{i}".encode())
        files.append(blocks / key[0:2] / f"{key}.blk")
        files[-1].unlink(missing_ok=True)  # only this snippet's own blocks, left by an earlier run
    out = run_snippet("section_6_1_hit_rate.py")
    assert "First lookup: 0/1000 hits" in out
    assert "Second lookup: 100/1000 hits (10.0%)" in out
    assert [f.exists() for f in files] == [True] * 100 + [False] * 900  # written down before the process exited
