"""Configuration shared by every UCM package: typed config sections (:mod:`ucm_config.spec`) and config documents
(:mod:`ucm_config.document`). It imports no other UCM package; ``ucm_store.config`` (the store's connectors and
their tiers) and ``ucm_sparse.config`` (GSA) parse their own sections of a document."""
from .document import DOCUMENT_KEYS, SPARSE_KEYS, read_document, reject_unknown, sparse_sections
from .spec import ConfigError, close_keys, describe_fields, parse_section, shown, spec, validate_fields

__all__ = ["ConfigError", "DOCUMENT_KEYS", "SPARSE_KEYS", "close_keys", "describe_fields", "parse_section",
           "read_document", "reject_unknown", "shown", "sparse_sections", "spec", "validate_fields"]
