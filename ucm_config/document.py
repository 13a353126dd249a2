"""Config documents, shared by the store (``ucm_store.config``) and GSA (``ucm_sparse.config``).

A document is a dict, or a YAML file holding one, in one of the tuning guide's shapes:

* a bare connector config: ``{"store_pipeline": "Cache|Posix", "storage_backends": "/data/ucm_cache", ...}``
  (the tuning guide's section 6.1 dict; also vLLM's ``kv_connector_extra_config``);
* ``{"ucm_connector_config": {...}}`` (the tuning guide's sections 4.1 and 4.4);
* a whole document: ``{"ucm_connectors": [{"ucm_connector_name": ..., "ucm_connector_config": {...}}],
  "ucm_sparse_method": "GSA", "ucm_sparse_config": {"GSA": {...}}}`` (the tuning guide's section 8);
* ``{"ucm_config_file": "path.yaml", ...}``: that file, with any other keys given beside it overriding it.

This module reads documents and hands out their sections raw; each package parses its own sections.
"""
import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .spec import ConfigError, close_keys, shown

logger = logging.getLogger(__name__)

SPARSE_KEYS = ("ucm_sparse_method", "ucm_sparse_config")
DOCUMENT_KEYS = ("ucm_connectors", "ucm_connector_config", "ucm_config_file") + SPARSE_KEYS


def read_document(source: str | Path | Mapping) -> dict:
    """The raw config document from a dict or a YAML file path, with ``ucm_config_file`` resolved."""
    if isinstance(source, (str, Path)):
        raw = _read_yaml(Path(source))
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raise ConfigError(f"config must be a dict or a YAML file path, got {type(source).__name__}")
    if "ucm_config_file" in raw:
        path = raw["ucm_config_file"]
        if not isinstance(path, (str, Path)):
            raise ConfigError("ucm_config_file: expected the path of a YAML file, got "
                              f"{shown(path, contents=False)}")
        overrides = {k: v for k, v in raw.items() if k != "ucm_config_file"}
        raw = _apply_overrides(_read_yaml(Path(path)), overrides)
    return raw


def sparse_sections(source: str | Path | Mapping) -> dict:
    """The raw ``ucm_sparse_method`` / ``ucm_sparse_config`` entries of a source, for ``ucm_sparse.config``."""
    doc = read_document(source)
    return {key: doc[key] for key in SPARSE_KEYS if key in doc}


def reject_unknown(mapping: Mapping, allowed: tuple, where: str) -> None:
    """Raise ConfigError naming the first key of ``mapping`` not in ``allowed`` (and the closest allowed keys)."""
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} in {where}: {close_keys(str(key), list(allowed))}")


def _apply_overrides(doc: dict, overrides: dict) -> dict:
    """Store keys given beside ``ucm_config_file`` override the file's (single) connector config."""
    sparse = {k: overrides.pop(k) for k in SPARSE_KEYS if k in overrides}
    doc = {**doc, **sparse}
    if not overrides:
        return doc
    if "ucm_connectors" in doc:
        entries = doc["ucm_connectors"]
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], Mapping):
            raise ConfigError("ucm_config_file: keys beside it override a file with exactly one connector; "
                              f"its ucm_connectors is {shown(entries, contents=False)}")
        entry = dict(entries[0])
        entry["ucm_connector_config"] = _merged(entry.get("ucm_connector_config"), overrides,
                                                "ucm_connectors[0].ucm_connector_config")
        return {**doc, "ucm_connectors": [entry]}
    if "ucm_connector_config" in doc:
        return {**doc, "ucm_connector_config": _merged(doc["ucm_connector_config"], overrides, "ucm_connector_config")}
    return {**doc, **overrides}


def _merged(section: Any, overrides: dict, where: str) -> dict:
    """The file's connector config ``section`` with ``overrides`` on top; ConfigError if it is not a mapping."""
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"{where} in the ucm_config_file must be a mapping of keys to values, got "
                          f"{shown(section, contents=False)}")
    return {**(section or {}), **overrides}


class _WarnOnDuplicateLoader(yaml.SafeLoader):
    """A YAML SafeLoader that logs keys given twice in one mapping (the later value wins, as in YAML)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the SafeLoader rejects it below, naming the line
            if key in seen:
                logger.warning("config key %r is given more than once (line %d); the last value wins",
                               key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path, or text that is not UTF-8
        raise ConfigError(f"config file {str(path)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        doc = yaml.load(text, Loader=_WarnOnDuplicateLoader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top, got {type(doc).__name__}")
    if "ucm_config_file" in doc:
        raise ConfigError(f"config file {str(path)!r} names ucm_config_file itself; nesting is not allowed")
    return doc


def _yaml_problem(exc: BaseException) -> str:
    """What is wrong and where, without the YAML parser's quote of the offending line (it may hold a secret)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"{exc.reason} at character {exc.position}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or type(exc).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
