"""Seed import path ``ucm.integration.vllm`` (vLLM is imported only by its submodules)."""
