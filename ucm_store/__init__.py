"""Tiered KV block store: config, hashing, pinned pool, transport, backends, pipeline, factory, metrics."""
