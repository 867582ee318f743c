"""Q8_0 embeddings for any NNX model (lowbit.ptq.quantize_embeddings): the encoding, the bound on the
logits against the float table, the checkpoint round trip, a non-Llama model, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit.models.gguf.encode import encode_values
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn import GgufEmbed, QuantRule, freeze, quantize_model, set_activations
from lowbit.ptq import embeddings
from lowbit.ptq.embeddings import quantize_embeddings


def _table(rows=96, k=64, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 0.05, (rows, k)).astype(np.float32)
    table[3] = 0.0  # an all-zero block: d = 0
    table[5, :32] *= 1e-4  # float16-subnormal scales
    table[7, 5] = 2.0  # an outlier that sets its block's scale
    return table


def _error_bound(table):
    """Per weight: |Q8_0(x) - x| <= d16 / 2 + 127 |d - d16|, d = max|x| / 127 of its block, d16 =
    float16(d) the stored scale: round(x / d16) is within 1/2 of x / d16 unless it is clipped at
    127, which happens only when d16 < d, and then |x| - 127 d16 <= 127 (d - d16)."""
    blocks = table.reshape(-1, 32).astype(np.float64)
    d = np.abs(blocks).max(axis=1) / 127
    d16 = d.astype(np.float16).astype(np.float64)
    bound = d16 / 2 + 127 * np.abs(d - d16)
    return np.repeat(bound, 32).reshape(table.shape)


def _dequantized(blocks):
    from lowbit.kernels.gguf_matmul import dequantize_blocks

    return np.asarray(dequantize_blocks(jnp.asarray(blocks), "Q8_0"), np.float64)


def test_q8_0_blocks_equal_the_gguf_encoder_and_meet_the_rounding_bound(monkeypatch):
    table = _table()
    monkeypatch.setattr(embeddings, "_ENCODE_ROWS", 40)  # encoded in 3 pieces
    holder = nnx.Dict(table=nnx.Embed(96, 64, rngs=nnx.Rngs(0)))
    holder["table"].embedding.set_value(jnp.asarray(table))
    quantize_embeddings(holder)
    blocks = np.asarray(holder["table"].blocks[...])
    assert blocks.shape == (96, 64 // 32 * 34) and blocks.dtype == np.uint8
    np.testing.assert_array_equal(blocks, encode_values(table, "Q8_0"))
    error = np.abs(_dequantized(blocks) - table)
    bound = _error_bound(table)
    assert np.all(error <= bound * (1 + 1e-6) + 1e-12)
    assert error.max() > 0.2 * bound.max()  # the bound is not vacuous
    assert np.all(_dequantized(blocks)[3] == 0)


def _tiny_llama(seed=0, **overrides):
    return Llama(LlamaConfig.tiny(**overrides), rngs=nnx.Rngs(seed))


def test_llama_logits_stay_within_q8_0_rounding_of_the_float_embedding():
    model = _tiny_llama()
    table = np.asarray(model.embed.embedding[...])
    reference = _tiny_llama()  # the same weights, float embedding
    sizes = quantize_embeddings(model)
    assert isinstance(model.embed, GgufEmbed) and sizes == {"embed": 128 * 64 // 32 * 34}
    dequantized = _dequantized(model.embed.blocks[...])
    # The head: |h (E_q - E)^T| <= sum_i |h_i| * bound_i for each vocabulary row, plus f32 rounding.
    h = jax.random.normal(jax.random.key(1), (2, 5, 64))
    got, want = np.asarray(model.head(h)), np.asarray(reference.head(h))
    normed = np.abs(np.asarray(reference.final_norm(h), np.float64))
    head_bound = np.einsum("bsd,vd->bsv", normed, _error_bound(table))
    slack = 1e-5 * np.einsum("bsd,vd->bsv", normed, np.abs(table))
    assert np.all(np.abs(got - want) <= head_bound + slack)
    assert np.abs(got - want).max() > 0.05 * head_bound.max()
    # The whole model is the float model run on the dequantized table (lookup and head), to f32 rounding.
    reference.embed.embedding.set_value(jnp.asarray(dequantized, jnp.float32))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)), rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_keeps_the_blocks_exactly(tmp_path):
    model = _tiny_llama(seed=2)
    quantize_model(model, QuantRule(path=r"layers\..*", weight_spec="int4:g32"), warn=False)
    freeze(model)  # packed int4 linears, as PTQ leaves them
    quantize_embeddings(model)
    lowbit.save(model, tmp_path / "ckpt")
    assert "embed" in lowbit.checkpoint.layer_bytes(tmp_path / "ckpt")
    assert lowbit.checkpoint.layer_bytes(tmp_path / "ckpt")["embed"] == model.embed.nbytes
    loaded = lowbit.load(tmp_path / "ckpt")
    assert isinstance(loaded.embed, GgufEmbed)
    np.testing.assert_array_equal(np.asarray(loaded.embed.blocks[...]), np.asarray(model.embed.blocks[...]))
    tokens = jnp.arange(20, dtype=jnp.int32)[None] % 128
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))
    # runtime "dequant": the table goes back into a float nnx.Embed, same codes
    floats = lowbit.load(tmp_path / "ckpt", runtime="dequant")
    assert isinstance(floats.embed, nnx.Embed)
    np.testing.assert_array_equal(np.asarray(floats.embed.embedding[...]),
                                  _dequantized(model.embed.blocks[...]).astype(np.float32))
    np.testing.assert_allclose(np.asarray(floats(tokens)), np.asarray(model(tokens)), rtol=1e-4, atol=1e-4)


class _TinyTagger(nnx.Module):
    """A non-Llama model: embedding, one linear, the tied head through nnx.Embed.attend."""

    def __init__(self, rngs):
        self.tokens = nnx.Embed(50, 32, rngs=rngs)
        self.mix = nnx.Linear(32, 32, rngs=rngs)

    def __call__(self, ids):
        return self.tokens.attend(jnp.tanh(self.mix(self.tokens(ids))))


def test_a_foreign_model_with_an_embedding_works_and_round_trips(tmp_path):
    model = _TinyTagger(nnx.Rngs(0))
    table = np.asarray(model.tokens.embedding[...])
    ids = jnp.asarray([[1, 7, 49, 3]])
    sizes = quantize_embeddings(model)
    assert sizes == {"tokens": 50 * 34} and isinstance(model.tokens, GgufEmbed)
    reference = _TinyTagger(nnx.Rngs(0))
    reference.tokens.embedding.set_value(jnp.asarray(_dequantized(model.tokens.blocks[...]), jnp.float32))
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(reference(ids)), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(reference.tokens.embedding[...]) - table).max() <= _error_bound(table).max()
    lowbit.save(model, tmp_path / "tagger")
    loaded = lowbit.load(tmp_path / "tagger", model=nnx.eval_shape(lambda: _TinyTagger(nnx.Rngs(0))))
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    # a rule over every path leaves the quantized embedding alone (it is not a linear)
    report = quantize_model(loaded, QuantRule(path=".*", weight_spec="int8:channel"), warn=False)
    assert set(report.layers) == {"mix"}



def _packed_tagger(weight_spec):
    model = _TinyTagger(nnx.Rngs(0))
    quantize_embeddings(model)
    quantize_model(model, QuantRule(path="mix", weight_spec=weight_spec), warn=False)
    freeze(model)
    return model


def test_set_activations_switches_the_layers_with_integer_codes_and_back():
    ids = jnp.asarray([[1, 7, 49, 3, 12]])
    model = _packed_tagger("int4:g16")
    before = np.asarray(model(ids))
    assert set_activations(model, "int8") == 2  # the Q8_0 embedding (its head) and the int4 linear
    assert model.tokens.activations == model.mix.activations == "int8"
    moved = np.abs(np.asarray(model(ids)) - before)
    assert 0 < moved.max() < 0.05 * np.abs(before).max()
    assert set_activations(model, "f32") == 2
    np.testing.assert_array_equal(np.asarray(model(ids)), before)
    code_book = _packed_tagger("nf4:g16")  # nf4 levels are not integers: that layer keeps f32
    assert set_activations(code_book, "int8") == 1 and code_book.mix.activations == "f32"
    with pytest.raises(ValueError, match="activations must be one of"):
        set_activations(model, "int4")

def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match=r"ggml_type must be one of \('Q8_0',\)"):
        quantize_embeddings(_tiny_llama(), "Q4_2")
    with pytest.raises(ValueError, match="activations must be one of"):
        quantize_embeddings(_tiny_llama(), activations="int4")
    with pytest.raises(ValueError, match="has no nnx.Embed"):
        quantize_embeddings(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
    odd = nnx.Embed(10, 48, rngs=nnx.Rngs(0))
    holder = nnx.Dict(table=odd)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quantize_embeddings(holder)
    assert holder["table"] is odd  # unchanged
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_values(np.zeros((4, 40), np.float32), "Q8_0")
    bad = nnx.Embed(4, 32, rngs=nnx.Rngs(0))
    bad.embedding.set_value(jnp.full((4, 32), jnp.nan))
    holder = nnx.Dict(table=bad)
    with pytest.raises(ValueError, match="finite"):
        quantize_embeddings(holder)
    assert holder["table"] is bad  # unchanged
