"""vLLM adapter of the store: the UCMConnector (the only package of ucm_store that imports vLLM)."""
