"""Seed import path ``ucm.shared.metrics``."""
