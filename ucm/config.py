"""The whole UCM config document as typed dataclasses: the store's connectors (``ucm_store.config``) and the sparse
method (``ucm_sparse.config``). :func:`load_ucm_config` is the boundary parser of everything a user writes."""
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ucm_config import sparse_sections
from ucm_sparse.config import SparseConfig, parse_sparse
from ucm_store.config import ConnectorSpec, parse_connectors


@dataclasses.dataclass(frozen=True)
class UcmConfig:
    """Everything a UCM config document declares."""

    connectors: tuple[ConnectorSpec, ...]
    sparse: SparseConfig


def load_ucm_config(source: str | Path | Mapping) -> UcmConfig:
    """Parse a whole config source (a dict or a YAML path, any form ``ucm_config.read_document`` accepts)."""
    return UcmConfig(connectors=tuple(parse_connectors(source)), sparse=parse_sparse(sparse_sections(source)))
