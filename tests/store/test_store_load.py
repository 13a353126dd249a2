"""Load: 8 processes x 20,000 mixed lookup / load / dump / commit calls on one storage directory, every load checked
bit-exact as it happens, then every committed block loaded back bit-exact by a fresh store (``bench/bench_store_load``
at full scale, without its plain-file baseline). The directory is a tmpfs mount, so the time CI takes does not hang on
the disk's metadata speed (on this shared VM disk, creating and removing 8,000 block files and their directories
alone took up to a minute); run the script itself for figures on a disk."""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_faults import mounted

REPO = Path(__file__).resolve().parents[2]
PROCESSES, OPS = 8, 20000


def test_eight_processes_of_mixed_calls_leave_every_committed_block_bit_exact(tmp_path):
    out = tmp_path / "out"
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=2g", "tmpfs") as disk:
        run = subprocess.run([sys.executable, "-m", "bench.bench_store_load", "--processes", str(PROCESSES),
                              "--ops", str(OPS), "--no-baseline", "--dir", str(disk)],
                             cwd=REPO, env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout + run.stderr
    print(run.stdout)
    (result,) = [json.loads(path.read_text()) for path in out.glob("store_load-*.json")]
    (ucm,) = result["rows"]
    assert ucm["ops"] == PROCESSES * OPS and min(ucm["counts"].values()) > 0
    assert result["verified_blocks"] == ucm["committed_blocks"] > 1000
