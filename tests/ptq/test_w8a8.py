"""SmoothQuant (smoothing is exact, W8A8 path), W8A8Linear and LLM.int8() layers."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.quantize import quantize
from lowbit.ptq.driver import module_at
from lowbit.ptq.layers import (LLMInt8Linear, W8A8Linear, parse_activation_spec,
                               quantize_activations)
from lowbit.ptq.llm_int8 import llm_int8_quantize
from lowbit.ptq.smoothquant import (check_w8a8_weight_spec, smooth_block, smooth_scales,
                                    smoothquant_quantize)


def _kernel(shape=(48, 24), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _inputs(shape=(2, 5, 48), seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2.0, jnp.float32)


def test_smoothing_alone_keeps_the_model_function(make_tiny, test_tokens):
    model = make_tiny()
    reference = model(test_tokens)
    rng = np.random.default_rng(0)
    absmax = {"attn_in": rng.uniform(0.01, 30.0, 64), "mlp_in": rng.uniform(0.01, 30.0, 64),
              "mlp_hidden": rng.uniform(0.01, 30.0, 128)}
    for block in model.layers:
        scales = smooth_block(block, absmax, 0.8, smooth_down=True)
        assert set(scales) == {"attn_in", "mlp_in", "mlp_hidden"}
        assert float(scales["attn_in"].max() / scales["attn_in"].min()) > 10.0
    np.testing.assert_allclose(model(test_tokens), reference, rtol=1e-4, atol=1e-4)


def test_smooth_scales_formula():
    rng = np.random.default_rng(1)
    act = rng.uniform(0.1, 20.0, 16)
    w1, w2 = rng.standard_normal((16, 8)), rng.standard_normal((16, 4)) * 3
    s = np.asarray(smooth_scales(act, [w1, w2], 0.7))
    w_max = np.maximum(np.abs(w1).max(1), np.abs(w2).max(1))
    np.testing.assert_allclose(s, act ** 0.7 / w_max ** 0.3, rtol=1e-5)


@pytest.mark.parametrize("mode", ["token", "tensor", "static"])
@pytest.mark.parametrize("weights", ["int8", "int8:channel"])
def test_w8a8_int8_path_equals_float_reference(mode, weights):
    w = _kernel()
    x = _inputs()
    q = quantize(w, weights, axis=0)
    layer = W8A8Linear.from_qarray(q, mode, 0.03 if mode == "static" else None)
    y = np.asarray(layer(x), np.float64)
    codes, scale = quantize_activations(x, mode, 0.03)
    if mode == "static":
        assert int(jnp.sum(jnp.abs(codes) == 127)) > 0  # the static range saturates
    x_values = np.asarray(codes, np.float64) * np.asarray(scale, np.float64)
    w_values = np.asarray(q.codes, np.float64) * np.asarray(q.scale_values(), np.float64)
    np.testing.assert_allclose(y, x_values @ w_values, rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 5, 24)


def _outlier_channels(model):
    """Makes 4 of 64 channels of every norm output 20x larger (activation outliers)."""
    for block in model.layers:
        for norm in (block.attn_norm, block.ffn_norm):
            w = np.asarray(norm.weight[...]).copy()
            w[[3, 17, 40, 55]] *= 20.0
            norm.weight.set_value(jnp.asarray(w))
    return model


def test_smoothquant_beats_naive_w8a8_with_outlier_channels(make_tiny, calibration,
                                                            test_tokens):
    reference = _outlier_channels(make_tiny())(test_tokens)
    errors = {}
    for alpha in (None, 0.5):
        model = _outlier_channels(make_tiny())
        result = smoothquant_quantize(model, calibration, "int8:channel", "int8:tensor:static",
                                      alpha=alpha, progress=False, batch_size=2)
        assert isinstance(model.layers[1].mlp.w_down, W8A8Linear)
        assert len(result.linears) == 14
        for entry in result.linears.values():
            assert entry.runtime == "w8a8" and entry.options["act"] == "static"
            assert entry.options["act_scale"] > 0
        out = model(test_tokens)
        errors[alpha] = float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
    assert errors[0.5] < 0.6 * errors[None]
    model = _outlier_channels(make_tiny())
    result = smoothquant_quantize(model, calibration, "int8:channel", "int8:tensor:static",
                                  alpha=0.5, smooth_down=True, progress=False, batch_size=2)
    assert "mlp_hidden" in result.block_reports[0]
    out = model(test_tokens)
    assert float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)) < errors[None]
    report = result.block_reports[0]["attn_in"]
    assert report["act_max_after"] < 0.5 * report["act_max_before"]


def test_llm_int8_outlier_columns_are_exact():
    w = _kernel()
    x = np.asarray(_inputs(seed=2)) * 0.5
    x[..., [5, 30]] = 9.0 * np.sign(x[..., [5, 30]] + 1e-3)  # two outlier feature columns
    x = jnp.asarray(x)
    q = quantize(w, "int8:channel", axis=0)
    layer = LLMInt8Linear.from_qarray(q, threshold=6.0)
    outliers = np.asarray(layer.outlier_features(x))
    assert np.flatnonzero(outliers).tolist() == [5, 30]
    w_values = np.asarray(q.dequantize(), np.float64)
    regular = np.where(outliers, 0.0, np.asarray(x))
    codes, scale = quantize_activations(jnp.asarray(regular), "token")
    int8_part = (np.asarray(codes, np.float64) * np.asarray(scale, np.float64)) @ w_values
    float_part = np.asarray(x, np.float64)[..., outliers] @ w_values[outliers]
    np.testing.assert_allclose(np.asarray(layer(x)), int8_part + float_part, rtol=1e-5,
                               atol=1e-5)
    # Moving an outlier value changes the output exactly linearly (no rounding there).
    bumped = x.at[..., 5].add(0.123)
    delta = np.asarray(layer(bumped), np.float64) - np.asarray(layer(x), np.float64)
    np.testing.assert_allclose(delta, 0.123 * np.broadcast_to(w_values[5], delta.shape),
                               rtol=1e-3, atol=1e-5)


def test_llm_int8_float_path_is_capped_at_max_outliers():
    w = _kernel()  # K = 48
    x = np.asarray(_inputs(seed=2)) * 0.5
    x[..., [5, 30, 40]] = np.array([9.0, 12.0, 7.0])  # three outliers, the cap takes two
    q = quantize(w, "int8:channel", axis=0)
    layer = LLMInt8Linear.from_qarray(q, threshold=6.0, max_outliers=2)
    assert np.flatnonzero(np.asarray(layer.outlier_features(jnp.asarray(x)))).tolist() == [5, 30]
    assert LLMInt8Linear.from_qarray(q).max_outliers == 6  # ceil(48 / 8)
    assert LLMInt8Linear.from_qarray(q, max_outliers=100).max_outliers == 48
    with pytest.raises(ValueError, match="max_outliers must be a positive integer"):
        LLMInt8Linear.from_qarray(q, max_outliers=0)


def test_llm_int8_without_threshold_is_vector_wise_int8():
    w = _kernel()
    x = _inputs()
    q = quantize(w, "int8:channel", axis=0)
    layer = LLMInt8Linear.from_qarray(q, threshold=None)
    codes, scale = quantize_activations(x, "token")
    expected = (np.asarray(codes, np.float64) * np.asarray(scale)) @ np.asarray(q.dequantize())
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_llm_int8_model(make_tiny, test_tokens):
    reference = make_tiny()(test_tokens)
    model = make_tiny()
    result = llm_int8_quantize(model, threshold=0.5, max_outliers=448)  # room for all
    assert isinstance(module_at(model, "layers.0.attn.wk"), LLMInt8Linear)
    assert result.bits_per_weight == pytest.approx((8 * 64 * 448 + 8 * 128 * 64
                                                    + 16 * (448 + 64)) / (64 * 448 + 128 * 64))
    out = model(test_tokens)
    assert float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)) < 0.02


@pytest.mark.parametrize("text, mode", [("int8:token", "token"), ("int8", "tensor"),
                                        ("int8:tensor", "tensor"),
                                        ("int8:tensor:static", "static")])
def test_activation_specs(text, mode):
    assert parse_activation_spec(text) == mode


@pytest.mark.parametrize("text", ["int4:token", "int8:g32", "int8:token:static", "nf4",
                                  "int8:token:asym", ""])
def test_bad_activation_specs(text):
    with pytest.raises(ValueError):
        parse_activation_spec(text)


@pytest.mark.parametrize("spec", ["int4:channel", "int8:g32", "int8:channel:asym", "nf4:g64"])
def test_smoothquant_rejects_non_int8_weights(spec, make_tiny, calibration):
    with pytest.raises(ValueError, match="int8"):
        check_w8a8_weight_spec(spec)
    with pytest.raises(ValueError):
        smoothquant_quantize(make_tiny(), calibration, spec, progress=False)


def test_bad_layer_arguments():
    q = quantize(_kernel(), "int8:channel", axis=0)
    with pytest.raises(ValueError, match="act_scale"):
        W8A8Linear.from_qarray(q, "static")
    with pytest.raises(ValueError, match="act_mode"):
        W8A8Linear.from_qarray(q, "row")
    with pytest.raises(ValueError, match="threshold"):
        LLMInt8Linear.from_qarray(q, threshold=0.0)
    with pytest.raises(ValueError, match="int8"):
        W8A8Linear.from_qarray(quantize(_kernel(), "int4:channel", axis=0), "token")
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_quantize(None, None, alpha=1.5)
