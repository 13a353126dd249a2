"""Typed config sections: field specs, validation and key suggestions shared by every config dataclass.

A config section is a frozen dataclass whose fields carry a :func:`spec` (one-line doc, allowed range or
choices). :func:`parse_section` turns a raw mapping (from YAML or a dict) into that dataclass: an unknown key
fails naming the key and the closest known keys; a wrong type or value fails naming the key, the value and
what is allowed. Construction in code goes through the same checks (``validate_fields`` in ``__post_init__``).
The value of a ``secret`` field is never shown (``***``), and a container given where a value or section belongs
is described by its type and keys only (:func:`shown`), so errors cannot carry credentials.
"""
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """Bad configuration: the message names the key, the value given and what is allowed."""


def spec(default: Any, doc: str, *, used_by: str = "", min: float | None = None, max: float | None = None,
         choices: tuple | None = None, min_exclusive: bool = False, secret: bool = False) -> Any:
    """A dataclass field with a default, a one-line doc, the part that uses it and the allowed range or choices;
    ``secret``: its value never appears in errors."""
    meta = {"doc": doc, "used_by": used_by, "min": min, "max": max, "choices": choices,
            "min_exclusive": min_exclusive, "secret": secret}
    return dataclasses.field(default=default, metadata=meta)


def shown(value: Any, secret: bool = False, contents: bool = True) -> str:
    """How an error shows a value given: ``***`` for a secret; a mapping by its keys and a nested container by its
    length (their values may hold credentials); a flat list by its repr only if ``contents`` (a list where a section
    belongs may hold anything); else the repr (at most 80 characters)."""
    if secret:
        return f"{type(value).__name__} ***"
    if isinstance(value, Mapping):
        return f"a mapping with keys {', '.join(repr(str(k))[:40] for k in list(value)[:8]) or '(none)'}"
    if isinstance(value, (list, tuple, set)):
        nested = any(isinstance(v, (Mapping, list, tuple, set)) for v in value)
        if nested or not contents:
            return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def close_keys(key: str, known: list[str]) -> str:
    """Human hint listing the known keys closest to ``key`` (or all of them when none is close)."""
    by_lower = {k.lower(): k for k in known}
    near = [by_lower[k] for k in difflib.get_close_matches(key.lower(), list(by_lower), n=3, cutoff=0.6)]
    return f"did you mean {', '.join(map(repr, near))}?" if near else f"known keys: {', '.join(sorted(known))}"


def parse_section(cls: type, raw: Any, where: str) -> Any:
    """Build the config dataclass ``cls`` from mapping ``raw``; ``where`` names the section in errors."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {shown(raw, contents=False)}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in {where}: {close_keys(str(key), known)}")
    try:
        return cls(**{key: _normalise(cls, key, value) for key, value in raw.items()})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def validate_fields(obj: Any) -> None:
    """Check every field of dataclass ``obj`` against its annotated type and spec; raise ConfigError."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        _check_type(f.name, value, hints[f.name], f.metadata.get("secret", False))
        _check_range(f.name, value, f.metadata)


def describe_fields(cls: type) -> list[dict]:
    """One dict per field (key, type, default, allowed, used_by, doc): the source of the config reference."""
    hints = typing.get_type_hints(cls)
    return [{"key": f.name, "type": _type_name(hints[f.name]), "default": f.default,
             "allowed": _allowed_text(f.metadata), "used_by": f.metadata["used_by"], "doc": f.metadata["doc"]}
            for f in dataclasses.fields(cls)]


def _normalise(cls: type, key: str, value: Any) -> Any:
    """YAML lists become tuples for tuple-typed fields (the dataclasses are frozen and hashable)."""
    if isinstance(value, list) and typing.get_origin(typing.get_type_hints(cls)[key]) is tuple:
        return tuple(value)
    return value


def _check_type(key: str, value: Any, hint: Any, secret: bool) -> None:
    if not _matches(value, hint):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {shown(value, secret)}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_range(key: str, value: Any, meta: Mapping) -> None:
    if value is None or isinstance(value, (bool, tuple)):
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}: nan is not a number; allowed: {_allowed_text(meta)}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(repr, meta['choices']))}")
    low, high = meta.get("min"), meta.get("max")
    too_low = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
    if too_low or (high is not None and value > high):
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {_allowed_text(meta)}")


def _allowed_text(meta: Mapping) -> str:
    if meta.get("choices") is not None:
        return " | ".join(map(repr, meta["choices"]))
    low, high = meta.get("min"), meta.get("max")
    if low is None and high is None:
        return "any"
    left = "" if low is None else (f"> {low}" if meta.get("min_exclusive") else f">= {low}")
    right = "" if high is None else f"<= {high}"
    return " and ".join(part for part in (left, right) if part)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(hint))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
