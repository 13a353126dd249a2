"""Seed import path ``ucm.shared.trans``: host <-> GPU transport."""
