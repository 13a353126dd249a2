"""Seed import path ``ucm.store``."""
