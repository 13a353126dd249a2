"""GSA configuration: the tuning guide's ``ucm_sparse_method`` / ``ucm_sparse_config: {GSA: {...}}`` sections of a
config document (:mod:`ucm_config.document`) as typed dataclasses; deeper code receives those only."""
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ucm_config import ConfigError, close_keys, parse_section, read_document, spec, validate_fields

SPARSE_METHODS = ("GSA",)


@dataclasses.dataclass(frozen=True)
class GSAConfig:
    """Block-sparse decode settings (the tuning guide's section 5)."""

    sparse_ratio: float = spec(0.3, "fraction of a sequence's KV blocks each decode step attends", min=0.0,
                               max=1.0, min_exclusive=True, used_by="GSA selection")
    local_window_sz: int = spec(4, "last blocks always attended (the local window)", min=0, used_by="GSA selection")
    init_window_sz: int = spec(1, "first blocks always attended (the attention sink)", min=0,
                               used_by="GSA selection")
    min_blocks: int = spec(8, "fewest blocks attended; shorter sequences stay dense", min=1, used_by="GSA selection")
    dense_first_layers: int = spec(0, "first decoder layers (index below this) that attend every block: early "
                                   "layers spread attention over the whole context, where a selection loses the "
                                   "most", min=0, used_by="GSA selection")
    rerank_candidates: float = spec(1.0, "two-stage selection: the score rule picks this many times the blocks "
                                    "attended as candidates, then the blocks of most exact attention of the "
                                    "current queries over the candidates' keys are kept (reads those keys; 1: one "
                                    "stage; not in the offload mode)", min=1.0, max=64.0,
                                    used_by="GSA selection")
    select_every: int = spec(1, "decode steps one selection serves: 1 selects at every step; N reuses a request's "
                             "selection for its next N - 1 steps, while its block count stays the same (a new "
                             "block, every block_size tokens, reselects; the block of the current token is always "
                             "attended)", min=1, max=1024, used_by="GSA selection")
    select_drift: float | None = spec(None, "with select_every > 1, a request also reselects a layer's blocks "
                                      "before select_every steps once its queries turned: one minus the mean, "
                                      "over the query heads, of the cosine similarity between each head's query and "
                                      "its query at the layer's last selection, above this (None: no drift rule)",
                                      min=0.0, max=1.0, min_exclusive=True, used_by="GSA selection")
    prefetch_workers: int = spec(4, "prefetch copy concurrency: the offload mode's prefetch copies run on their own "
                                 "CUDA stream with 16 copy programs per worker", min=1, max=256,
                                 used_by="GSA offload")
    prefetch_ahead: int = spec(4, "decode steps a selection predicts for the offload prefetch (0: no prefetch)",
                               min=0, max=1024, used_by="GSA offload")
    max_pending_prefetch: int = spec(128, "requests whose predicted blocks one step's prefetch brings in at most (of "
                                     "those that did not run the step before, the most recently run first)", min=1,
                                     used_by="GSA offload")
    score: str = spec("quest", "block score: Quest upper bound (min/max keys), mean-key dot product, or gauss "
                      "(each query head's attention share estimated from the min/max keys, summed over its group)",
                      choices=("quest", "mean", "gauss"), used_by="GSA selection")
    repr_dtype: str = spec("cache", "dtype of the block summaries selection reads: the KV cache's, or fp8 (e4m3, "
                           "a power-of-two scale per block and KV head; half the bytes of bf16, Quest bounds "
                           "rounded outward)", choices=("cache", "fp8"), used_by="GSA selection")
    token_budget: int | None = spec(None, "attend this many tokens per step instead of sparse_ratio", min=1,
                                    used_by="GSA selection")
    offload: bool = spec(False, "keep the full KV in the store's Cache tier, only hot blocks on the GPU",
                         used_by="GSA offload")
    gpu_budget_blocks: int = spec(4096, "blocks per layer kept on the GPU in offload mode", min=1,
                                  used_by="GSA offload")
    gpu_budget_bytes: int | None = spec(None, "GPU bytes for hot KV in offload mode, all layers together; replaces "
                                        "gpu_budget_blocks when set", min=1, used_by="GSA offload")

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.select_drift is not None and self.select_every == 1:
            raise ConfigError(f"select_drift: {self.select_drift!r} needs select_every > 1 (at select_every 1 every "
                              "step selects afresh, so no selection is reused); set select_every or drop "
                              "select_drift")

    def sparse_layer(self, layer: object) -> bool:
        """False for a decoder layer index below ``dense_first_layers`` (it attends every block); True for any
        other layer, and for a layer key that is not an index (``None``, a name)."""
        return not (isinstance(layer, int) and not isinstance(layer, bool) and layer < self.dense_first_layers)


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """The sparse method in use (``None``: dense attention) and its settings."""

    method: str | None = None
    gsa: GSAConfig = dataclasses.field(default_factory=GSAConfig)

    @property
    def enabled(self) -> bool:
        """True when a sparse method is selected."""
        return self.method is not None


def parse_sparse(sections: Mapping) -> SparseConfig:
    """Parse ``{"ucm_sparse_method": ..., "ucm_sparse_config": {...}}`` into a SparseConfig."""
    method = sections.get("ucm_sparse_method")
    if method is not None and method not in SPARSE_METHODS:
        raise ConfigError(f"ucm_sparse_method: {method!r} is not a known method; "
                          f"allowed: {', '.join(SPARSE_METHODS)} (or leave it out for dense attention)")
    raw = sections.get("ucm_sparse_config") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"ucm_sparse_config: expected a mapping like {{GSA: {{...}}}}, got {raw!r}")
    for name in raw:
        if name not in SPARSE_METHODS:
            hint = close_keys(str(name), list(SPARSE_METHODS))
            raise ConfigError(f"unknown key {name!r} in ucm_sparse_config: {hint}")
    return SparseConfig(method=method, gsa=parse_section(GSAConfig, raw.get("GSA"), "ucm_sparse_config.GSA"))


def load_gsa_fragment(source: str | Path | Mapping) -> GSAConfig:
    """Parse a bare GSA section (the tuning guide's section 5 snippets, e.g. ``sparse_ratio: 0.3``)."""
    return parse_section(GSAConfig, read_document(source), "the GSA config")
