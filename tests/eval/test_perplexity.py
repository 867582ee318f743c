"""Tests of perplexity and KL divergence on tiny random models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.eval import kl_divergence, perplexity
from lowbit.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig.tiny()


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CONFIG.vocab_size, 5 * 32 + 7)


def test_uniform_logits_give_perplexity_equal_to_vocab_size(tokens):
    uniform = Llama(CONFIG, rngs=nnx.Rngs(1))
    uniform.embed.embedding[...] = jnp.zeros_like(uniform.embed.embedding[...])
    result = perplexity(uniform, tokens, ctx=32, batch_size=2)
    assert result.ppl == pytest.approx(CONFIG.vocab_size, rel=1e-5)
    assert result.nll == pytest.approx(math.log(CONFIG.vocab_size), rel=1e-6)
    assert (result.windows, result.tokens_scored) == (5, 5 * 31)


def test_perplexity_matches_a_direct_computation(model, tokens):
    windows = np.asarray(tokens[: 3 * 32]).reshape(3, 32)
    logits = np.asarray(jax.jit(model.__call__)(jnp.asarray(windows, jnp.int32)), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs[:, :-1], windows[:, 1:, None], -1).mean()
    for batch_size in (1, 2):  # batch 2 pads the last batch; the pad must not count
        result = perplexity(model, tokens, ctx=32, windows=3, batch_size=batch_size)
        assert result.nll == pytest.approx(nll, rel=1e-5)
        assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_kl_of_a_model_against_itself_is_zero(model, tokens):
    result = kl_divergence(model, model, tokens, ctx=32, windows=4, batch_size=3)
    assert abs(result.kl) < 1e-6
    assert result.top1 == 1.0
    assert result.ppl == pytest.approx(result.ref_ppl, rel=1e-6)
    assert result.ppl == pytest.approx(perplexity(model, tokens, ctx=32, windows=4).ppl, rel=1e-5)
    assert result.tokens_scored == 4 * 31


def test_kl_against_a_uniform_model(model, tokens):
    """KL(uniform || p) = -log V - mean_v log p_v, and top-1 agreement is argmax(p) == 0
    (the argmax of constant logits is index 0)."""
    uniform = Llama(CONFIG, rngs=nnx.Rngs(1))
    uniform.embed.embedding[...] = jnp.zeros_like(uniform.embed.embedding[...])
    windows = jnp.asarray(np.asarray(tokens[:64]).reshape(2, 32), jnp.int32)
    log_p = jax.nn.log_softmax(jax.jit(model.__call__)(windows)[:, :-1], axis=-1)
    expected = float(jnp.mean(-math.log(CONFIG.vocab_size) - log_p.mean(-1)))
    agree = float(jnp.mean(jnp.argmax(log_p, -1) == 0))
    result = kl_divergence(model, uniform, tokens, ctx=32, windows=2)
    assert result.kl == pytest.approx(expected, rel=1e-5)
    assert result.kl > 0
    assert result.top1 == pytest.approx(agree)
    assert result.ref_ppl == pytest.approx(CONFIG.vocab_size, rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ctx=1), "ctx must be an integer >= 2"),
    (dict(ctx=32, windows=6), r"windows must be None or an integer in \[1, 5\]"),
    (dict(ctx=32, windows=0), "windows must be None"),
    (dict(ctx=1000), "fewer than one window"),
    (dict(ctx=32, batch_size=0), "batch_size must be a positive integer"),
])
def test_bad_arguments_are_rejected(model, tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(model, tokens, **kwargs)


def test_bad_tokens_are_rejected(model, tokens):
    with pytest.raises(ValueError, match="1-D integer array"):
        perplexity(model, np.asarray(tokens).reshape(-1, 1), ctx=32)
    with pytest.raises(ValueError, match="vocab_size"):
        perplexity(model, np.full(64, CONFIG.vocab_size), ctx=32)
    with pytest.raises(ValueError, match="ref_model.config.vocab_size"):
        small = Llama(LlamaConfig.tiny(vocab_size=16), rngs=nnx.Rngs(0))
        kl_divergence(model, small, np.full(64, 20), ctx=32)


# Values computed by the scorers as they were before they became one (tiny model, Rngs(7),
# int2:g16:asym RTN copy; the first 5 * 32 + 7 tokens of default_rng(0) below 128). The default
# convention's numbers must not move.
SAVED = {"ppl": 211.688723828114, "kl": 0.45240213794092976, "top1": 0.12096774193548387,
         "kl_ppl": 211.81130043452626, "ref_ppl": 197.01573581999526,
         "scorer_kl": 0.4523901862482871, "scorer_ppl": 211.81127437014118}


@pytest.fixture(scope="module")
def saved_models():
    from lowbit.ptq.rtn import rtn_quantize

    reference = Llama(CONFIG, rngs=nnx.Rngs(7))
    quantized = Llama(CONFIG, rngs=nnx.Rngs(7))
    rtn_quantize(quantized, "int2:g16:asym")
    return reference, quantized


def test_default_convention_values_are_unchanged(saved_models, tokens):
    from lowbit.eval import ReferenceScorer

    reference, quantized = saved_models
    tokens = np.asarray(tokens, np.int32)
    assert perplexity(reference, tokens, ctx=32).ppl == pytest.approx(SAVED["ppl"], rel=1e-6)
    r = kl_divergence(quantized, reference, tokens, ctx=32, windows=4, batch_size=3)
    assert (r.kl, r.top1, r.ppl, r.ref_ppl) == pytest.approx(
        (SAVED["kl"], SAVED["top1"], SAVED["kl_ppl"], SAVED["ref_ppl"]), rel=1e-5)
    got = ReferenceScorer(reference, tokens, ctx=32, windows=4).score(quantized)
    assert got["kl"] == pytest.approx(SAVED["scorer_kl"], rel=1e-5)  # f16-stored reference
    assert got["ppl"] == pytest.approx(SAVED["scorer_ppl"], rel=1e-6)
    assert got["ref_ppl"] == pytest.approx(SAVED["ref_ppl"], rel=1e-6)


def test_second_half_scores_only_the_second_half_of_each_window(model, tokens):
    """llama.cpp's convention: logits at positions ctx//2 .. ctx-2 predict tokens ctx//2+1 ..
    ctx-1 of each window (15 positions of a 32-token window)."""
    windows = np.asarray(tokens[: 3 * 32]).reshape(3, 32)
    logits = np.asarray(jax.jit(model.__call__)(jnp.asarray(windows, jnp.int32)), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs[:, :-1], windows[:, 1:, None], -1)[..., 0]
    second_half = -picked[:, 16:].mean()
    result = perplexity(model, tokens, ctx=32, windows=3, batch_size=2, score="second-half")
    assert (result.tokens_scored, result.score) == (3 * 15, "second-half")
    assert result.nll == pytest.approx(second_half, rel=1e-5)
    assert result.nll != pytest.approx(-picked.mean(), rel=1e-3)
    kl = kl_divergence(model, model, tokens, ctx=32, windows=3, score="second-half")
    assert kl.ppl == pytest.approx(result.ppl, rel=1e-5) and kl.tokens_scored == 3 * 15
    with pytest.raises(ValueError, match="score must be one of all, second-half"):
        perplexity(model, tokens, ctx=32, score="half")


def test_position_sums_weights_and_reference():
    from lowbit.eval import position_sums, summarize_sums

    log_probs = jax.nn.log_softmax(jnp.asarray([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]]]), -1)
    uniform = jnp.full((1, 2, 3), -math.log(3.0))
    targets = jnp.asarray([[2, 0]])
    sums = position_sums(log_probs, targets, jnp.asarray([[1.0, 0.0]]), uniform)
    expected_nll = -float(log_probs[0, 0, 2])
    expected_kl = float(-math.log(3.0) - log_probs[0, 0].mean())
    assert np.asarray(sums) == pytest.approx([expected_nll, math.log(3.0), expected_kl, 0.0, 1.0],
                                             rel=1e-6)
    summary = summarize_sums(sums)
    assert summary["ppl"] == pytest.approx(math.exp(expected_nll), rel=1e-6)
    assert summary["tokens"] == 1 and summary["ref_ppl"] == pytest.approx(3.0, rel=1e-6)


def test_reference_scorer_matches_perplexity_and_kl(make_tiny):
    from lowbit.eval import ReferenceScorer
    from lowbit.ptq.rtn import rtn_quantize

    reference = make_tiny()
    tokens = np.random.default_rng(0).integers(0, 128, 80).astype(np.int32)
    scorer = ReferenceScorer(reference, tokens, ctx=16, windows=4)
    assert scorer.ref_ppl == pytest.approx(perplexity(reference, tokens, ctx=16, windows=4).ppl,
                                           rel=1e-5)
    itself = scorer.score(reference)
    assert itself["kl"] == pytest.approx(0.0, abs=1e-5) and itself["top1"] == 1.0
    quantized = make_tiny()
    rtn_quantize(quantized, "int2:g16:asym")
    got = scorer.score(quantized)
    expected = kl_divergence(quantized, reference, tokens, ctx=16, windows=4)
    assert got["kl"] == pytest.approx(expected.kl, rel=1e-3)
    assert got["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
    assert got["top1"] == pytest.approx(expected.top1)
    with pytest.raises(ValueError, match="windows"):
        ReferenceScorer(reference, tokens, ctx=16, windows=6)
