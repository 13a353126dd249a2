"""Seed import path ``ucm.store.factory``: UcmConnectorFactory."""
from ucm_store.factory import UcmConnectorFactory

__all__ = ["UcmConnectorFactory"]
