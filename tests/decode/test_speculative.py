"""Speculative decoding: greedy output equals the target's, sampled tokens follow the target's
distribution (chi-square), the tokens-per-call formula, and rollback leaves plain-decode caches."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as scipy_stats

from lowbit.decode import (SpeculativeDecoder, expected_tokens_per_call, generate, layer_draft, predicted_speedup,
                           speculative_accept)
from lowbit.decode.speculative import quantized_draft, warp_probs
from lowbit.decode.step import decode_step, prefill_step
from lowbit.kvcache.cache import DenseKVCache, PagedKVCache
from lowbit.kvcache.store import read_layer
from lowbit.models.gguf.encode import encode_values
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn.gguf_layers import GgufEmbed, GgufLinear
from lowbit.ptq.embeddings import quantize_embeddings
from lowbit.ptq.rtn import rtn_quantize


@pytest.fixture(scope="module")
def target():
    return Llama(LlamaConfig.tiny(head_dim=32, max_seq_len=256, n_layers=3), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("layout,paged", [("f32", False), pytest.param("f32", True, marks=pytest.mark.slow),
                                          pytest.param("int8", False, marks=pytest.mark.slow), ("int4", True)])
def test_greedy_equals_target_greedy(target, layout, paged):
    rng = np.random.default_rng(1)
    decoder = SpeculativeDecoder(target, layer_draft(target, 1), gamma=3, layout=layout, paged=paged,
                                 page_size=16 if paged else None)
    accepted = 0
    for _ in range(8):
        prompt = rng.integers(0, target.config.vocab_size, int(rng.integers(2, 40)))
        expected = generate(target, prompt, 24, layout=layout)
        np.testing.assert_array_equal(decoder.generate(prompt, 24), expected)
        accepted += decoder.stats.accepted
    assert accepted > 0  # the draft's tokens are really used


def test_greedy_with_an_independent_draft_and_eos(target):
    other = Llama(LlamaConfig.tiny(head_dim=32, max_seq_len=256, n_layers=1), rngs=nnx.Rngs(5))
    decoder = SpeculativeDecoder(target, other, gamma=4)
    prompt = np.arange(5, 17)
    full = generate(target, prompt, 30)
    eos = int(full[7])
    got = decoder.generate(prompt, 30, eos_id=eos)
    np.testing.assert_array_equal(got, full[:list(full).index(eos) + 1])


def _exact_marginals(model, prompt, steps, temperature, top_k, top_p):
    """P(token at new position j) for j < steps under the target's warped distribution, by
    enumerating every continuation (small vocabulary)."""
    vocab = model.config.vocab_size
    seqs = np.array(list(itertools.product(range(vocab), repeat=steps - 1)), np.int32).reshape(-1, steps - 1)
    tokens = np.concatenate([np.broadcast_to(prompt, (len(seqs), len(prompt))), seqs], axis=1)
    logits = model(jnp.asarray(tokens))[:, len(prompt) - 1:]
    probs = np.asarray(warp_probs(logits, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p)),
                       np.float64)
    path = np.ones(len(seqs))
    marginals = []
    for j in range(steps):
        if j:
            path = path * probs[np.arange(len(seqs)), j - 1, seqs[:, j - 1]]
        # sequences are enumerated over all later tokens too: count each prefix once
        weight = path / vocab ** (steps - 1 - j)
        marginals.append((weight[:, None] * probs[:, j]).sum(axis=0))
    return marginals


@pytest.mark.parametrize("temperature,top_k,top_p,threshold", [(1.0, 0, 1.0, 0.5),
                                                               pytest.param(0.7, 5, 0.9, 0.0, marks=pytest.mark.slow)])
def test_samples_follow_the_target_distribution(temperature, top_k, top_p, threshold):
    config = LlamaConfig.tiny(vocab_size=8, head_dim=32, max_seq_len=64, n_layers=2)
    model = Llama(config, rngs=nnx.Rngs(3))
    # sharpen the toy model so that draft and target disagree visibly
    model.embed.embedding[...] = model.embed.embedding[...] * 2.0
    draft = layer_draft(model, 1)
    prompt = np.array([1, 5, 2])
    decoder = SpeculativeDecoder(model, draft, gamma=2, confidence_threshold=threshold)
    steps, n = 3, 600
    counts = np.zeros((steps, config.vocab_size))
    drafted = calls = 0
    for seed in range(n):
        out = decoder.generate(prompt, steps, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        counts[np.arange(steps), out] += 1
        drafted, calls = drafted + decoder.stats.drafted, calls + decoder.stats.target_calls
    if threshold:  # adaptive gamma stopped some rounds after one draft token, not all
        assert calls < drafted < 2 * calls
    expected = _exact_marginals(model, prompt, steps, temperature, top_k, top_p)
    for j in range(1, steps):  # position 0 comes from the prefill; 1 and 2 from verification
        keep = expected[j] > 0
        assert counts[j][~keep].sum() == 0
        _, pvalue = scipy_stats.chisquare(counts[j][keep], expected[j][keep] / expected[j][keep].sum() * n)
        assert pvalue > 1e-3, (j, counts[j], expected[j] * n)


def test_acceptance_matches_the_formula():
    rng = np.random.default_rng(0)
    for alpha in (0.3, 0.6, 0.85):
        for gamma in (1, 3, 5):
            p = np.tile([alpha, 1 - alpha], (gamma + 1, 1))
            q = np.tile([1.0, 0.0], (gamma, 1))  # each draft token is kept with probability alpha
            rounds = 20000
            made = sum(speculative_accept(p, q, [0] * gamma, rng)[0] + 1 for _ in range(rounds))
            assert made / rounds == pytest.approx(expected_tokens_per_call(alpha, gamma), rel=0.02)
    assert predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert expected_tokens_per_call(1.0, 3) == 4


def test_rejected_tokens_sample_the_residual():
    rng = np.random.default_rng(2)
    p = np.array([[0.5, 0.3, 0.2], [1 / 3] * 3])
    q = np.array([[0.2, 0.2, 0.6]])
    counts = np.zeros(3)
    for _ in range(20000):
        accepted, token = speculative_accept(p, q, [2], rng)
        if accepted == 0:
            counts[token] += 1
    residual = np.maximum(p[0] - q[0], 0)
    assert counts[2] == 0  # max(0, p - q) is 0 there
    np.testing.assert_allclose(counts / counts.sum(), residual / residual.sum(), atol=0.02)


def _plain_decode_cache(model, cache, tokens, prompt_len):
    """Prefill tokens[:prompt_len], then decode the rest one token at a time."""
    graphdef, params = nnx.split(model)
    slot = cache.open()
    padded = np.zeros(64, np.int32)
    padded[:prompt_len] = tokens[:prompt_len]
    cache.reserve(slot, prompt_len)
    key = jax.random.key_data(jax.random.key(0))
    _, _, cache.state = prefill_step(graphdef, params, cache.state, cache.spec, jnp.asarray(padded), jnp.int32(0),
                                     jnp.int32(prompt_len), jnp.int32(slot), jnp.asarray(cache.block_tables()[slot]),
                                     jnp.float32(0), key, jnp.int32(0))
    cache.advance(slot, prompt_len)
    for position in range(prompt_len, len(tokens)):
        cache.reserve(slot, position + 1)
        _, _, cache.state = decode_step(graphdef, params, cache.state, cache.spec, jnp.asarray([tokens[position]]),
                                        jnp.asarray([position], jnp.int32), jnp.ones(1, bool),
                                        jnp.asarray(cache.block_tables()), jnp.zeros(1, jnp.float32), key[None],
                                        jnp.zeros(1, jnp.int32))
        cache.advance(slot, position + 1)
    return cache


def _assert_same_cache(cache, plain, n_layers, length):
    """Every layer's keys and values of the first `length` positions of slot 0 agree."""
    for layer in range(n_layers):
        for name in ("k", "v"):
            ours = read_layer(cache.state, cache.spec, name, layer, jnp.asarray(cache.block_tables()[:1]),
                              jnp.asarray([length - 1]))[0, :length]
            theirs = read_layer(plain.state, plain.spec, name, layer, jnp.asarray(plain.block_tables()[:1]),
                                jnp.asarray([length - 1]))[0, :length]
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,paged", [("f32", True), pytest.param("int8", False, marks=pytest.mark.slow)])
def test_rollback_leaves_the_cache_of_a_plain_decode(target, layout, paged):
    draft = layer_draft(target, 1)
    decoder = SpeculativeDecoder(target, draft, gamma=4, layout=layout, paged=paged, page_size=16 if paged else None)
    prompt = np.arange(3, 20)
    out = decoder.generate(prompt, 40)
    assert decoder.stats.tested > decoder.stats.accepted  # some draft tokens were rejected
    for cache, model in ((decoder.target_cache, target), (decoder.draft_cache, draft)):
        tokens = np.concatenate([prompt, out])
        length = min(cache.length(0), len(tokens))  # past the output: accepted tokens max_new_tokens cut
        cache.truncate(0, length)
        tokens = tokens[:length]
        kind = PagedKVCache if paged else DenseKVCache
        plain = _plain_decode_cache(model, kind(model.config, layout, slots=1, max_len=cache.max_len,
                                                page_size=cache.page_size), tokens, len(prompt))
        assert plain.length(0) == length
        if paged:
            assert len(cache.pages(0)) == cache.pages_needed(length) == len(plain.pages(0))
            assert cache.allocator.num_used == plain.allocator.num_used
        _assert_same_cache(cache, plain, model.config.n_layers, length)


def test_refuses_caches_that_cannot_roll_back(target):
    draft = layer_draft(target, 1)
    for policy in ("h2o:0.5", "window:32", "sinks:4,window:32"):
        with pytest.raises(ValueError, match="cannot roll back"):
            SpeculativeDecoder(target, draft, policy=policy)
    with pytest.raises(ValueError, match="cannot roll back"):
        SpeculativeDecoder(target, draft, layout="kivi2")
    cache = DenseKVCache(target.config, "f32", "window:16", slots=1, max_len=64)
    cache.open()
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.truncate(0, 0)


def test_bad_arguments(target):
    with pytest.raises(ValueError, match="n_layers"):
        layer_draft(target, 3)
    with pytest.raises(ValueError, match="gamma"):
        SpeculativeDecoder(target, layer_draft(target, 1), gamma=0)
    other = Llama(LlamaConfig.tiny(vocab_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(target, other)
    decoder = SpeculativeDecoder(target, layer_draft(target, 1))
    with pytest.raises(ValueError, match="top_p"):
        decoder.generate([1, 2], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        decoder.generate([1, 2], 300)


def test_layer_draft_shares_the_weights(target):
    draft = layer_draft(target, 2)
    assert draft.layers[1].mlp.w_up.kernel[...] is target.layers[1].mlp.w_up.kernel[...]
    assert draft.embed.embedding[...] is target.embed.embedding[...]
    tokens = jnp.asarray([[4, 8, 15, 16]])
    hidden = target.embed_tokens(tokens)
    for block in target.layers[:2]:
        hidden = block(hidden, jnp.arange(4)[None])
    np.testing.assert_allclose(np.asarray(draft(tokens)), np.asarray(target.head(hidden)), rtol=1e-6)
    assert len(target.layers) == 3


def test_fully_accepted_rounds_cost_no_extra_draft_call(target):
    """With the target as its own draft every round is accepted whole; the round's last draft token
    reaches the draft cache in the next draft pass, so draft passes = drafted tokens, the output is
    the greedy one and the draft cache holds what a plain decode writes."""
    decoder = SpeculativeDecoder(target, target, gamma=3)
    prompt = np.arange(7, 30)
    out = decoder.generate(prompt, 25)
    np.testing.assert_array_equal(out, generate(target, prompt, 25))
    stats = decoder.stats
    assert stats.accepted == stats.drafted == 3 * stats.target_calls and stats.target_calls == 6  # 24 tokens after the prefill's
    assert stats.draft_calls == stats.drafted
    cache = decoder.draft_cache
    tokens = np.concatenate([prompt, out])
    length = cache.length(0)
    # the target cache lacks the last token (never fed); the draft also the final round's last draft
    assert length == decoder.target_cache.length(0) - 1 == len(tokens) - 2
    plain = _plain_decode_cache(target, DenseKVCache(target.config, "f32", slots=1, max_len=cache.max_len),
                                tokens[:length], len(prompt))
    _assert_same_cache(cache, plain, target.config.n_layers, length)


def test_adaptive_gamma_drafts_less_and_stays_exact(target):
    prompt = np.arange(2, 14)
    expected = generate(target, prompt, 20)
    fixed = SpeculativeDecoder(target, layer_draft(target, 2), gamma=4)
    np.testing.assert_array_equal(fixed.generate(prompt, 20), expected)
    assert fixed.stats.drafted == 4 * fixed.stats.target_calls
    # a random toy model is never sure: every round stops after its first draft token
    adaptive = SpeculativeDecoder(target, layer_draft(target, 2), gamma=4, confidence_threshold=0.99)
    np.testing.assert_array_equal(adaptive.generate(prompt, 20), expected)
    assert adaptive.stats.drafted == adaptive.stats.draft_calls == adaptive.stats.target_calls
    with pytest.raises(ValueError, match="confidence_threshold"):
        SpeculativeDecoder(target, layer_draft(target, 1), confidence_threshold=1.0)


def test_quantized_draft_is_rtn_of_the_target_sharing_its_head(target):
    draft = quantized_draft(target, "int4:g32")
    reference = nnx.clone(target)
    rtn_quantize(reference, "int4:g32")
    tokens = jnp.asarray([[4, 8, 15, 16, 23, 42]])
    np.testing.assert_array_equal(np.asarray(draft(tokens)), np.asarray(reference(tokens)))
    assert draft.embed.embedding[...] is target.embed.embedding[...]
    assert draft.layers[0].attn_norm.weight[...] is target.layers[0].attn_norm.weight[...]
    assert type(target.layers[0].attn.wq) is nnx.Linear  # the target is untouched
    np.testing.assert_array_equal(SpeculativeDecoder(target, draft, gamma=3).generate([5, 6, 7], 16),
                                  generate(target, [5, 6, 7], 16))
    with pytest.raises(ValueError, match="weights"):
        quantized_draft(target, "int9:gx")
    lower = quantized_draft(draft, "int2:g32")  # from packed layers too: their dequantized weights
    assert lower.layers[2].mlp.w_down.spec.bits == 2 and draft.layers[2].mlp.w_down.spec.bits == 4
    rotated = nnx.clone(target)
    rtn_quantize(rotated, "int4:g32:asym")
    rotated.layers[0].attn.wq.input_transform = "hadamard"
    with pytest.raises(ValueError, match="not a plain matrix product"):
        quantized_draft(rotated, "int2:g32")


def test_an_int8_activation_draft_is_cheaper_arithmetic_and_the_output_stays_the_targets(target):
    """activations="int8" switches every packed linear of the draft (only the draft's: the shared
    embedding and the target keep theirs); the draft's logits move by the activation rounding, and the
    speculative output is still exactly the target's greedy output."""
    f32_draft = quantized_draft(target, "int4:g32")
    draft = quantized_draft(target, "int4:g32", activations="int8")
    linears = [layer for block in draft.layers for layer in (block.attn.wq, block.mlp.w_down)]
    assert {layer.activations for layer in linears} == {"int8"}
    tokens = jnp.asarray([[4, 8, 15, 16, 23, 42]])
    moved = np.abs(np.asarray(draft(tokens)) - np.asarray(f32_draft(tokens)))
    assert 0 < moved.max() < 0.1 * np.abs(np.asarray(f32_draft(tokens))).max()
    np.testing.assert_array_equal(SpeculativeDecoder(target, draft, gamma=3).generate([5, 6, 7], 16),
                                  generate(target, [5, 6, 7], 16))
    with pytest.raises(ValueError, match="activations"):
        quantized_draft(target, "int4:g32", activations="int4")


def test_a_gguf_block_draft_holds_llamacpp_blocks_and_the_output_stays_the_targets(target):
    """quantized_draft(target, "Q8_0") holds each block linear as the Q8_0 blocks GGUF export writes
    for that matrix (GgufLinear), computes with the values they decode to, and speculation with it is
    exact; with a Q8_0 head of the draft's own (quantize_embeddings) the target keeps its f32 table."""
    draft = quantized_draft(target, "q8_0", activations="int8")
    wq = draft.layers[1].attn.wq
    assert isinstance(wq, GgufLinear) and wq.ggml_type == "Q8_0" and wq.activations == "int8"
    matrix = np.asarray(target.layers[1].attn.wq.kernel[...])
    np.testing.assert_array_equal(np.asarray(wq.blocks[...]), encode_values(matrix.T, "Q8_0"))
    decoded = np.asarray(wq.dequantized_matrix())
    assert 0 < np.abs(decoded - matrix).max() <= np.abs(matrix).max() / 127  # at most a Q8_0 step
    quantize_embeddings(draft, "Q8_0", activations="int8")
    assert isinstance(draft.embed, GgufEmbed) and isinstance(target.embed, nnx.Embed)
    np.testing.assert_array_equal(SpeculativeDecoder(target, draft, gamma=3).generate([5, 6, 7], 16),
                                  generate(target, [5, 6, 7], 16))
    with pytest.raises(ValueError, match="GGUF block type"):
        quantized_draft(target, "q5_k")
