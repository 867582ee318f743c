"""lowbit.decode.generate: single-sequence (or same-length batch) generation through the model's own
blocks over a contiguous KV cache: greedy equals repeated full forwards, eos, sampling, buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.decode import generate, prompt_bucket
from lowbit.decode.step import prefill_step
from lowbit.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig.tiny()
_forward = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens), static_argnums=0)


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, rngs=nnx.Rngs(0))


def _tokens(seed, shape):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, shape).astype(np.int32)


def _greedy_by_full_forwards(model, prompt, n):
    """Causality lets one fixed-length (zero-padded) forward stand for each prefix."""
    b, length = prompt.shape
    sequence = jnp.zeros((b, length + n), jnp.int32).at[:, :length].set(prompt)
    graphdef, state = nnx.split(model)
    for t in range(length, length + n):
        next_token = jnp.argmax(_forward(graphdef, state, sequence)[:, t - 1], axis=-1)
        sequence = sequence.at[:, t].set(next_token.astype(jnp.int32))
    return np.asarray(sequence[:, length:])


def test_greedy_generate_equals_argmax_of_repeated_full_forwards(model):
    prompt = _tokens(15, (2, 5))
    new = generate(model, prompt, max_new_tokens=7)
    np.testing.assert_array_equal(new, _greedy_by_full_forwards(model, prompt, 7))
    np.testing.assert_array_equal(generate(model, prompt[0], max_new_tokens=7), new[0])


def test_generate_stops_at_eos_and_sampling_follows_the_key(model):
    prompt = _tokens(16, (6,))
    greedy = generate(model, prompt, max_new_tokens=6)
    stopped = generate(model, prompt, max_new_tokens=6, eos_id=int(greedy[2]))
    first = int(np.flatnonzero(greedy == greedy[2])[0])
    np.testing.assert_array_equal(stopped, greedy[: first + 1])
    both = generate(model, np.stack([prompt, _tokens(17, (6,))]), 6, eos_id=int(greedy[2]))
    np.testing.assert_array_equal(both[0], np.r_[greedy[: first + 1], [greedy[2]] * (5 - first)])
    a = generate(model, prompt, 8, temperature=1.0, key=jax.random.key(0))
    b = generate(model, prompt, 8, temperature=1.0, key=jax.random.key(0))
    c = generate(model, prompt, 8, temperature=1.0, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    cold = generate(model, prompt, 6, temperature=1e-4, key=jax.random.key(2))  # samples the argmax
    np.testing.assert_array_equal(cold, greedy)


def test_generate_rejects_bad_arguments(model):
    prompt = _tokens(17, (4,))
    with pytest.raises(ValueError, match="key must be"):
        generate(model, prompt, 3, temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be"):
        generate(model, prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt, CONFIG.max_seq_len)
    with pytest.raises(ValueError, match="token ids must lie in"):
        generate(model, np.array([CONFIG.vocab_size]), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
    assert generate(model, prompt, 0).shape == (0,)


def test_prompt_buckets():
    assert [prompt_bucket(n) for n in (1, 16, 17, 100, 128, 129, 514, 520, 640)] == \
        [16, 16, 32, 128, 128, 256, 640, 640, 640]


def test_prompts_of_one_bucket_share_one_compiled_prefill_and_stay_exact(model):
    """Prompts of 17..32 tokens pad to 32: one prefill executable; the padding never changes
    the greedy tokens (against repeated full forwards of the unpadded sequence)."""
    sizes = []
    for length, seed in ((19, 21), (30, 22)):
        prompt = _tokens(seed, (1, length))
        stamps = {}
        new = generate(model, prompt, max_new_tokens=4, timings=stamps)
        assert stamps["bucket"] == 32
        assert stamps["start"] <= stamps["first_token"] <= stamps["end"]
        np.testing.assert_array_equal(new, _greedy_by_full_forwards(model, prompt, 4))
        sizes.append(prefill_step.compiled_count())
    assert sizes[1] == sizes[0]  # the second length compiled nothing new
