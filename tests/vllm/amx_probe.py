"""bench/vllm_driver.py with a probe at the first CPU attention kernel call, for tests/vllm/test_amx.py.

``python tests/vllm/amx_probe.py DRIVER_ARGS...`` runs the driver in this process and appends to the file named by
``$UCM_SIGALTSTACK_LOG`` (the sigaltstack shim's log, or a plain file) ``PROBE pid=P event=start`` first, then at
the first call of vLLM's CPU attention kernel ``PROBE pid=P event=first_attention tokens=N amx_permission=0|1``
(query tokens of that forward pass; whether the process holds AMX tile permission then). With
``UCM_PROBE_FAKE_AMX_FLAG=1``, ``ucm_store.cpu_features`` sees an ``amx_tile`` CPU flag (vLLM does not), so a CPU
without AMX makes the permission request too (Linux refuses it there).
"""
import os
import sys
from pathlib import Path

DRIVER_DIR = Path(__file__).resolve().parents[2] / "bench"


def log(line: str) -> None:
    """Append one probe line to ``$UCM_SIGALTSTACK_LOG``."""
    fd = os.open(os.environ["UCM_SIGALTSTACK_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"PROBE pid={os.getpid()} {line}\n".encode())
    finally:
        os.close(fd)


def probe_first_attention() -> None:
    """Wrap vLLM's CPU attention kernel so that its first call logs its query tokens and the AMX permission."""
    import vllm._custom_ops as ops

    from ucm_store.cpu_features import amx_permission_held

    kernel = ops.cpu_attention_with_kv_cache

    def first_call(*args, **kwargs):
        ops.cpu_attention_with_kv_cache = kernel
        log(f"event=first_attention tokens={kwargs['query'].shape[0]} amx_permission={int(amx_permission_held())}")
        return kernel(*args, **kwargs)

    ops.cpu_attention_with_kv_cache = first_call  # cpu_attn.py calls it as ops.cpu_attention_with_kv_cache(...)


if __name__ == "__main__":
    log("event=start")
    sys.path.insert(0, str(DRIVER_DIR))
    from vllm_driver import main  # first: it sets vLLM's environment defaults

    if os.environ.get("UCM_PROBE_FAKE_AMX_FLAG") == "1":
        from ucm_store import cpu_features

        cpu_features.cpu_flags = lambda: frozenset({cpu_features.AMX_FLAG})
    probe_first_attention()
    main()
