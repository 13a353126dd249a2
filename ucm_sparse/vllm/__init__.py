"""GSA inside vLLM: a ``vllm.general_plugins`` entry point (:mod:`.plugin`) that registers an attention backend.

The backend runs GSA when the connector's ``kv_connector_extra_config`` (or the YAML it names with
``ucm_config_file``) has ``ucm_sparse_method: "GSA"``, and is vLLM's own backend otherwise. Only this package
imports vLLM.
"""
