"""Seed import path ``ucm.shared.trans``: host <-> GPU transport."""
from ucm_store.transport import CUDATransport

__all__ = ["CUDATransport"]
