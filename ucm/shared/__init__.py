"""Seed import path ``ucm.shared``: transport, pinned pool and metrics."""
