"""Shared pytest fixtures: the real SmolLM2 model file (fetched once into the default cache), and
tiny random Llama models with token batches for the PTQ and command-line tests."""

import jax
import numpy as np
import pytest
from flax import nnx

from lowbit.models.llama import Llama, LlamaConfig


@pytest.fixture(autouse=True, scope="module")
def _compiled_executables_are_freed_after_each_module():
    """Every executable XLA:CPU keeps loaded holds about nine memory maps; the whole suite in one
    process compiles enough of them to pass Linux's limit of 65530 maps per process
    (vm.max_map_count), after which compiling fails and then segfaults (jax 0.10.2; seen on CI and
    here on 2026-12-04 at 90-96% of the suite). Dropping JAX's caches and the decode steps that
    StoredJit holds after each test module frees them."""
    from lowbit.decode.compilation import StoredJit

    yield
    jax.clear_caches()
    StoredJit.clear_all()


@pytest.fixture(autouse=True)
def _compilation_cache_stays_in_its_test():
    """A test that runs `lowbit generate` in-process turns on JAX's persistent compilation cache
    (and StoredJit's) for the whole process; turn them back off after it, so that later tests do
    not write every executable they compile to ~/.cache/lowbit/jax."""
    from jax._src import compilation_cache

    from lowbit.decode.compilation import StoredJit

    before = (jax.config.jax_compilation_cache_dir, StoredJit.directory)
    yield
    if (jax.config.jax_compilation_cache_dir, StoredJit.directory) != before:
        jax.config.update("jax_compilation_cache_dir", before[0])
        StoredJit.directory = before[1]
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (downloaded and verified on first use)."""
    from lowbit.models.registry import fetch

    return fetch("smollm2-135m")


@pytest.fixture
def make_tiny():
    """Builds the same tiny random model every call (2 blocks, d_model 64, GQA 4/2 heads)."""

    def build(**overrides):
        return Llama(LlamaConfig.tiny(**overrides), rngs=nnx.Rngs(7))

    return build


@pytest.fixture
def calibration():
    """[4, 32] int tokens inside the tiny vocabulary."""
    return np.random.default_rng(3).integers(0, 128, (4, 32)).astype(np.int32)


@pytest.fixture
def test_tokens():
    return np.random.default_rng(4).integers(0, 128, (2, 32)).astype(np.int32)
