"""Seed import path ``ucm.shared.metrics.ucmmonitor``: the StatsMonitor."""
from ucm_store.metrics import StatsMonitor

__all__ = ["StatsMonitor"]
