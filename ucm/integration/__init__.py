"""Seed import path ``ucm.integration``."""
