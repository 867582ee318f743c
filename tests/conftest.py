"""Shared pytest fixtures: the real SmolLM2 model file, fetched once into the default cache."""

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (downloaded and verified on first use)."""
    from lowbit.models.registry import fetch

    return fetch("smollm2-135m")
