"""Runs a benchmark's ``main(['--smoke'])`` in a fresh interpreter on the CPU (Triton's interpreter is chosen
before triton is first imported there) and returns the rows it printed."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def smoke_rows(module: str, timeout: int = 600) -> list[dict]:
    """The rows ``bench.<module>.main(['--smoke'])`` returns; fails the test with its stderr when it fails."""
    script = f"import json, bench.{module} as b; print('ROWS ' + json.dumps(b.main(['--smoke'])))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ROWS "))[5:])
