"""Tests of the Llama decoder: masking, attention, RoPE layouts, attention over a cache, loading."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.models.llama import Llama, LlamaConfig, apply_rope, rope_angles

CONFIG = LlamaConfig.tiny()


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, rngs=nnx.Rngs(0))


_jit_forward = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens),
                       static_argnums=0)


def run(model, tokens):
    """The full forward, jit-compiled (eager calls compile every primitive separately)."""
    return _jit_forward(*nnx.split(model), tokens)


@pytest.fixture(scope="module")
def forward():
    """The jitted forward shared by the tests: (graphdef, state, tokens) -> logits."""
    return _jit_forward


def _tokens(seed, shape, vocab=CONFIG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _rope_permutation(n_heads, head_dim):
    """Column order that maps HF (rotate_half) q/k columns to the GGUF (interleaved) order:
    new column h*hd + 2j + a takes old column h*hd + a*hd/2 + j."""
    j = np.arange(head_dim // 2)
    per_head = np.stack([j, j + head_dim // 2], axis=1).reshape(-1)
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


# ---- config -------------------------------------------------------------------------------
def test_config_from_dict_round_trip_and_numpy_ints():
    d = CONFIG.to_dict()
    assert LlamaConfig.from_dict(d) == CONFIG
    d["n_layers"] = np.uint32(3)
    d["norm_eps"] = np.float32(1e-6)
    config = LlamaConfig.from_dict(d)
    assert config.n_layers == 3 and type(config.n_layers) is int
    assert config.norm_eps == pytest.approx(1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(rope_layout="neox"), "rope_layout must be one of"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(vocab_size=12.5), "vocab_size must be a positive integer"),
    (dict(n_layers=True), "n_layers must be a positive integer"),
    (dict(norm_eps=-1.0), "norm_eps must be a positive"),
    (dict(tied_embeddings="yes"), "tied_embeddings must be True or False"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **change)


def test_config_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"\['hidden_size'\] are unknown"):
        LlamaConfig.from_dict({**CONFIG.to_dict(), "hidden_size": 3})
    d = CONFIG.to_dict()
    del d["ffn_dim"]
    with pytest.raises(ValueError, match="missing required keys \\['ffn_dim'\\]"):
        LlamaConfig.from_dict(d)


def test_smollm2_preset_parameter_count():
    config = LlamaConfig.smollm2_135m()
    assert config.n_params == 134_515_008


# ---- module structure ---------------------------------------------------------------------
def test_projections_are_bias_free_linears_at_stable_paths(model):
    paths = {".".join(map(str, path)): module for path, module in nnx.iter_modules(model)
             if isinstance(module, nnx.Linear)}
    expected = {f"layers.{i}.{part}" for i in range(CONFIG.n_layers)
                for part in ("attn.wq", "attn.wk", "attn.wv", "attn.wo",
                             "mlp.w_gate", "mlp.w_up", "mlp.w_down")}
    assert set(paths) == expected
    assert all(module.bias is None for module in paths.values())
    untied = Llama(dataclasses.replace(CONFIG, tied_embeddings=False), rngs=nnx.Rngs(0))
    assert isinstance(untied.lm_head, nnx.Linear) and not hasattr(model, "lm_head")


def test_pieces_compose_to_the_full_forward(model, forward):
    tokens = _tokens(1, (2, 12))
    positions = jnp.arange(12)[None, :]

    @jax.jit
    def pieces(state, tokens):
        m = nnx.merge(graphdef, state)
        x = m.embed_tokens(tokens)
        for block in m.layers:
            x = block(x, positions)
        return m.head(x)

    graphdef, state = nnx.split(model)
    np.testing.assert_allclose(pieces(state, tokens), forward(graphdef, state, tokens),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_tracks_float32(model):
    """Same f32 parameters, bf16 activations and matmuls: logits stay f32 and close."""
    fast = Llama(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    tokens = _tokens(19, (1, 12))
    reference, logits = run(model, tokens), run(fast, tokens)
    assert logits.dtype == jnp.float32
    assert float(jnp.abs(logits - reference).max()) < 0.1 * float(jnp.abs(reference).max())
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) >= 0.75


# ---- attention ----------------------------------------------------------------------------
def test_causal_mask_future_tokens_do_not_change_earlier_logits(model, forward):
    tokens = _tokens(2, (1, 16))
    changed = tokens.at[0, 9:].set(_tokens(3, (7,)))
    a = forward(*nnx.split(model), tokens)
    b = forward(*nnx.split(model), changed)
    np.testing.assert_allclose(a[:, :9], b[:, :9], rtol=1e-6, atol=1e-6)
    assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-2


def _numpy_rope_half(x, positions, base):
    hd = x.shape[-1]
    inv_freq = base ** (-np.arange(0, hd // 2) * 2.0 / hd)
    angle = positions[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_block_with_equal_kv_heads_matches_numpy_multi_head_attention():
    config = LlamaConfig.tiny(n_heads=4, n_kv_heads=4, rope_base=500.0)
    block = Llama(config, rngs=nnx.Rngs(3)).layers[0]
    block.attn_norm.weight[...] = jnp.linspace(0.5, 1.5, config.d_model)
    s, hd, h = 10, config.head_dim, config.n_heads
    x = np.random.default_rng(4).normal(size=(1, s, config.d_model)).astype(np.float32)
    got = np.asarray(block(jnp.asarray(x), jnp.arange(s)[None]))

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + config.norm_eps) * w

    w = {name: np.asarray(getattr(block.attn, name).kernel[...], np.float64)
         for name in ("wq", "wk", "wv", "wo")}
    xn = rms(x[0].astype(np.float64), np.asarray(block.attn_norm.weight[...]))
    positions = np.arange(s, dtype=np.float64)
    heads = []
    for head in range(h):
        cols = slice(head * hd, (head + 1) * hd)
        q = _numpy_rope_half((xn @ w["wq"][:, cols])[:, None], positions, config.rope_base)[:, 0]
        k = _numpy_rope_half((xn @ w["wk"][:, cols])[:, None], positions, config.rope_base)[:, 0]
        v = xn @ w["wv"][:, cols]
        scores = q @ k.T / np.sqrt(hd)
        scores[np.triu_indices(s, 1)] = -np.inf
        probs = np.exp(scores - scores.max(axis=1, keepdims=True))
        heads.append(probs / probs.sum(axis=1, keepdims=True) @ v)
    h1 = x[0] + np.concatenate(heads, axis=1) @ w["wo"]
    mlp = block.mlp
    hn = rms(h1, np.asarray(block.ffn_norm.weight[...]))
    gate = hn @ np.asarray(mlp.w_gate.kernel[...], np.float64)
    hidden = gate / (1 + np.exp(-gate)) * (hn @ np.asarray(mlp.w_up.kernel[...], np.float64))
    expected = h1 + hidden @ np.asarray(mlp.w_down.kernel[...], np.float64)
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-4)


def test_grouped_kv_heads_equal_repeated_kv_heads():
    """GQA with 2 KV heads equals MHA whose KV heads are those 2, each repeated twice."""
    gqa = Llama(CONFIG, rngs=nnx.Rngs(5))
    mha_config = dataclasses.replace(CONFIG, n_kv_heads=CONFIG.n_heads)
    mha = Llama(mha_config, rngs=nnx.Rngs(6))
    group, hd = CONFIG.n_heads // CONFIG.n_kv_heads, CONFIG.head_dim
    for a, b in zip(gqa.layers, mha.layers):
        for name in ("wk", "wv"):
            kernel = getattr(a.attn, name).kernel[...].reshape(CONFIG.d_model, -1, 1, hd)
            getattr(b.attn, name).kernel[...] = jnp.repeat(kernel, group, axis=2).reshape(
                CONFIG.d_model, -1)
    for name in ("wq", "wo"):
        for a, b in zip(gqa.layers, mha.layers):
            getattr(b.attn, name).kernel[...] = getattr(a.attn, name).kernel[...]
    for a, b in zip(gqa.layers, mha.layers):
        for name in ("w_gate", "w_up", "w_down"):
            getattr(b.mlp, name).kernel[...] = getattr(a.mlp, name).kernel[...]
    mha.embed.embedding[...] = gqa.embed.embedding[...]
    tokens = _tokens(7, (2, 9))
    np.testing.assert_allclose(run(mha, tokens), run(gqa, tokens), rtol=1e-5, atol=1e-5)


# ---- RoPE ---------------------------------------------------------------------------------
def test_rope_layouts_agree_after_the_gguf_permutation(forward):
    half = Llama(CONFIG, rngs=nnx.Rngs(8))
    interleaved = Llama(dataclasses.replace(CONFIG, rope_layout="interleaved"),
                        rngs=nnx.Rngs(8))
    q_perm = _rope_permutation(CONFIG.n_heads, CONFIG.head_dim)
    k_perm = _rope_permutation(CONFIG.n_kv_heads, CONFIG.head_dim)
    for a, b in zip(half.layers, interleaved.layers):
        b.attn.wq.kernel[...] = a.attn.wq.kernel[...][:, q_perm]
        b.attn.wk.kernel[...] = a.attn.wk.kernel[...][:, k_perm]
    tokens = _tokens(9, (2, 20))
    expected = forward(*nnx.split(half), tokens)
    np.testing.assert_allclose(forward(*nnx.split(interleaved), tokens), expected,
                               rtol=1e-5, atol=1e-5)
    # Without the permutation the interleaved model is a different function.
    plain = Llama(dataclasses.replace(CONFIG, rope_layout="interleaved"), rngs=nnx.Rngs(8))
    assert np.abs(forward(*nnx.split(plain), tokens) - expected).max() > 1e-2


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_dot_product_depends_only_on_position_difference(layout):
    rng = np.random.default_rng(10)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)

    def score(pq, pk):
        cq, sq = rope_angles(jnp.array([[pq]]), 32, 10000.0)
        ck, sk = rope_angles(jnp.array([[pk]]), 32, 10000.0)
        return float(jnp.sum(apply_rope(q, cq, sq, layout) * apply_rope(k, ck, sk, layout)))

    base = score(7, 3)
    for shift in (1, 10, 100):
        assert score(7 + shift, 3 + shift) == pytest.approx(base, rel=1e-4, abs=1e-4)
    assert abs(score(7, 3) - score(7, 5)) > 1e-3
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)


# ---- attention over a cache --------------------------------------------------------------
class _ConcatCache:
    """The simplest AttentionCache: per layer, every key/value so far, concatenated (one sequence
    batch, positions given in order)."""

    def __init__(self, n_layers):
        self.keys = [None] * n_layers
        self.values = [None] * n_layers
        self.calls = []

    def attend(self, layer, q, k, v, rotate_query):
        self.calls.append((layer, q.shape, k.shape))
        if self.keys[layer] is not None:
            k = jnp.concatenate([self.keys[layer], k], axis=1)
            v = jnp.concatenate([self.values[layer], v], axis=1)
        self.keys[layer], self.values[layer] = k, v
        b, s, h, d = q.shape
        t, n_kv = k.shape[1], k.shape[2]
        scores = jnp.einsum("bskgd,btkd->bkgst", q.reshape(b, s, n_kv, h // n_kv, d), k) * d ** -0.5
        mask = jnp.arange(t)[None, :] <= (t - s + jnp.arange(s))[:, None]
        probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, h, d), self


def test_blocks_over_a_cache_equal_the_causal_forward_chunk_by_chunk(model, forward):
    """The model's own blocks take a cache through attend(layer, q, k, v, rotate_query): a prompt
    in two chunks and then one token at a time give the logits of the causal forward."""
    tokens = _tokens(11, (2, 14))
    full = forward(*nnx.split(model), tokens)
    cache = _ConcatCache(CONFIG.n_layers)
    for start, stop in ((0, 5), (5, 8)) + tuple((t, t + 1) for t in range(8, 14)):
        positions = jnp.arange(start, stop, dtype=jnp.int32)[None]
        hidden, cache = model.run_blocks(model.embed_tokens(tokens[:, start:stop]), positions, cache)
        np.testing.assert_allclose(model.head(hidden), full[:, start:stop], rtol=1e-4, atol=1e-4)
    assert [c[0] for c in cache.calls[:CONFIG.n_layers]] == list(range(CONFIG.n_layers))
    assert cache.calls[0][1:] == ((2, 5, CONFIG.n_heads, CONFIG.head_dim),
                                  (2, 5, CONFIG.n_kv_heads, CONFIG.head_dim))


def test_rotate_query_rotates_the_unrotated_query_at_other_positions(model):
    """rotate_query(p) gives the query that attention would have used at positions p."""
    x = jax.random.normal(jax.random.key(3), (1, 4, CONFIG.d_model))
    seen = {}

    class Probe:
        def attend(self, layer, q, k, v, rotate_query):
            seen["q"], seen["again"] = q, rotate_query(jnp.arange(4)[None] + 6)
            return jnp.zeros_like(q), self

    def probe(positions):
        model.layers[0](x, positions, Probe())
        return dict(seen)

    at_0, at_6 = probe(jnp.arange(4)[None]), probe(jnp.arange(4)[None] + 6)
    np.testing.assert_allclose(at_0["again"], at_6["q"], rtol=1e-6, atol=1e-6)
    assert not np.allclose(at_0["again"], at_0["q"], atol=1e-3)


# ---- loading ------------------------------------------------------------------------------
def _named_weights(model):
    return [(name, np.asarray(variable[...])) for name, variable in model.weight_table().items()]


def test_from_weights_rebuilds_the_model_exactly(model, forward):
    weights = _named_weights(model)
    consumed = []

    def stream():
        for name, array in weights:
            consumed.append(name)
            yield name, array

    loaded = Llama.from_weights(CONFIG, stream())
    assert consumed == [name for name, _ in weights]
    tokens = _tokens(18, (1, 10))
    np.testing.assert_array_equal(forward(*nnx.split(loaded), tokens),
                                  forward(*nnx.split(model), tokens))
    from_mapping = Llama.from_weights(CONFIG.to_dict(), dict(weights))
    np.testing.assert_array_equal(from_mapping.layers[1].mlp.w_up.kernel[...],
                                  model.layers[1].mlp.w_up.kernel[...])
    untied = Llama(dataclasses.replace(CONFIG, tied_embeddings=False), rngs=nnx.Rngs(1))
    names = [name for name, _ in _named_weights(untied)]
    assert names[-1] == "lm_head" and untied.weight_table()["lm_head"].shape == (64, 128)


def test_from_weights_reports_unknown_missing_and_misshapen(model):
    weights = _named_weights(model)
    with pytest.raises(ValueError, match=r"unknown names \['bogus'\]; missing names "
                                         r"\['layers.1.wq'\]"):
        Llama.from_weights(CONFIG, [(n, a) for n, a in weights if n != "layers.1.wq"]
                           + [("bogus", np.zeros(3, np.float32))])
    bad = [(n, a.T if n == "layers.0.wk" else a) for n, a in weights]
    with pytest.raises(ValueError, match="'layers.0.wk' has shape \\(32, 64\\)"):
        Llama.from_weights(CONFIG, bad)
    with pytest.raises(ValueError, match="given twice"):
        Llama.from_weights(CONFIG, weights[:2] + weights[1:])
