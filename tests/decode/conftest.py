"""A tiny random Llama shared by the decode tests (2 blocks, 4 query heads over 2 KV heads)."""

import numpy as np
import pytest
from flax import nnx

from lowbit.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="session")
def tiny_model():
    config = LlamaConfig.tiny(head_dim=32, max_seq_len=256)
    return Llama(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def one_block_model():
    """One block: its keys and values come straight from the embeddings, so two ways of computing
    them agree bit for bit and quantization codes cannot flip between them."""
    config = LlamaConfig.tiny(head_dim=32, max_seq_len=256, n_layers=1)
    return Llama(config, rngs=nnx.Rngs(1))


@pytest.fixture(scope="session")
def token_rows(tiny_model):
    rng = np.random.default_rng(0)
    return rng.integers(0, tiny_model.config.vocab_size, (2, 64)).astype(np.int32)
