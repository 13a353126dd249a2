"""GSA block-sparse decode: config, per-request state, planner, prefetcher, vLLM adapter."""
