"""Seed import path ``ucm.integration.vllm.ucm_connector`` (vLLM's ``kv_connector_module_path``): UCMConnector."""
from ucm_store.vllm.connector import UCMConnector

__all__ = ["UCMConnector"]
