"""The real SmolLM2-135M through lowbit's Llama: loading, RoPE layout, perplexity, decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.data.corpus import load_text
from lowbit.decode import generate
from lowbit.eval import perplexity
from lowbit.models.gguf.llama_names import iter_llama_weights
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.models.loader import load_gguf_model
from lowbit.models.tokenizer import Tokenizer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_gguf_model(smollm2_path)


@pytest.fixture(scope="module")
def corpus_tokens(smollm2_path):
    return np.asarray(Tokenizer.from_gguf(smollm2_path).encode(load_text()[:20000]), np.int32)


def test_loaded_config_is_smollm2(smollm2):
    model, config = smollm2
    assert config == LlamaConfig.smollm2_135m()
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(leaf.size for leaf in params) == config.n_params
    assert all(leaf.dtype == jnp.float32 for leaf in params)


def test_perplexity_on_english_is_plausible_and_the_wrong_rope_layout_is_much_worse(
        smollm2, smollm2_path, corpus_tokens):
    model, config = smollm2
    good = perplexity(model, corpus_tokens, ctx=256, windows=2)
    assert 5 < good.ppl < 30, good
    wrong_config = dataclasses.replace(config, rope_layout="interleaved")
    wrong = Llama.from_weights(wrong_config, iter_llama_weights(smollm2_path))
    bad = perplexity(wrong, corpus_tokens, ctx=256, windows=2)
    assert bad.ppl > 2 * good.ppl, (good, bad)


def test_cached_greedy_generation_matches_full_forward(smollm2, corpus_tokens):
    model, _ = smollm2
    prompt = corpus_tokens[:24]
    new = generate(model, prompt, max_new_tokens=4)
    sequence = jnp.asarray(np.concatenate([prompt, new])[None], jnp.int32)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, sequence)
    np.testing.assert_array_equal(np.argmax(logits[0, 23:-1], axis=-1), new)
