"""Static activation quantization with calibrated clip thresholds, ActQuantLinear, and RTN with
a clipping observer, on the tiny random Llama."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.quantize import quantize
from lowbit.ptq.act_quant import act_quantize
from lowbit.ptq.driver import INPUT_GROUPS, LINEAR_NAMES, module_at
from lowbit.ptq.layers import ActQuantLinear, fake_quantize_static
from lowbit.ptq.rtn import rtn_quantize


def _relative_change(out, reference):
    out, reference = np.asarray(out, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(out - reference).mean() / np.abs(reference).mean())


def test_fake_quantize_static_saturates_and_rounds():
    x = jnp.asarray([[-3.0, -0.26, 0.0, 0.24, 0.5, 2.0]], jnp.float32)
    y = np.asarray(fake_quantize_static(x, 1.0, 3))  # qmax 3, step 1/3
    np.testing.assert_allclose(y, [[-1.0, -1 / 3, 0.0, 1 / 3, 2 / 3, 1.0]], rtol=1e-6)
    per_channel = np.asarray(fake_quantize_static(x, jnp.asarray([1, 1, 1, 1, 1, 0.1]), 8))
    assert per_channel[0, 5] == pytest.approx(0.1)


def test_act_quant_linear_quantizes_the_input_of_the_wrapped_linear(make_tiny):
    linear = make_tiny().layers[0].attn.wq
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 64)), jnp.float32)
    layer = ActQuantLinear(linear, 1.5, 4)
    np.testing.assert_allclose(np.asarray(layer(x)),
                               np.asarray(linear(fake_quantize_static(x, 1.5, 4))), rtol=1e-6)
    assert layer.kernel is linear.kernel
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        ActQuantLinear(linear, 1.0, 9)
    with pytest.raises(ValueError, match="threshold"):
        ActQuantLinear(linear, -1.0, 8)


def test_eight_bit_activations_change_outputs_slightly_four_bits_more(make_tiny, calibration,
                                                                      test_tokens):
    reference = make_tiny()(test_tokens)
    changes = {}
    for bits in (8, 4):
        model = make_tiny()
        result = act_quantize(model, calibration, bits, "minmax", progress=False, batch_size=2)
        for index in range(len(model.layers)):
            for name in LINEAR_NAMES:
                assert isinstance(module_at(model.layers[index], name), ActQuantLinear)
        changes[bits] = _relative_change(model(test_tokens), reference)
        assert result.method == "act" and result.settings["act_bits"] == bits
        assert result.settings["observer"] == "minmax"
        assert len(result.block_reports) == len(model.layers)
    assert 0.0 < changes[8] < 0.1
    assert changes[4] > 5 * changes[8]


@pytest.mark.parametrize("observer", ["mse", "aciq_laplace", "aciq_gaussian", "percentile", "kl"])
def test_calibrated_thresholds_do_not_exceed_minmax(make_tiny, calibration, observer):
    minmax = act_quantize(make_tiny(), calibration, 4, "minmax", progress=False)
    other = act_quantize(make_tiny(), calibration, 4, observer, progress=False)
    # block 0 sees the same embeddings in both runs; later blocks see their own inputs
    for group in INPUT_GROUPS:
        assert other.block_reports[0][group]["threshold"] <= \
            minmax.block_reports[0][group]["threshold"] * (1 + 1e-6)
    for report in other.block_reports:
        for group in INPUT_GROUPS:
            assert 0.0 < report[group]["threshold"] <= report[group]["absmax"] * (1 + 1e-6)
    for report in minmax.block_reports:  # all tokens are sampled here (stride 1)
        for group in INPUT_GROUPS:
            assert report[group]["threshold"] == pytest.approx(report[group]["absmax"])
            assert report[group]["clipped_fraction"] == 0.0


def test_mse_thresholds_beat_minmax_at_four_bits(make_tiny, calibration, test_tokens):
    reference = make_tiny()(test_tokens)
    errors = {}
    for observer in ("minmax", "mse"):
        model = make_tiny()
        act_quantize(model, calibration, 4, observer, progress=False)
        errors[observer] = _relative_change(model(test_tokens), reference)
    assert errors["mse"] < errors["minmax"]


def test_per_channel_thresholds_and_combination_with_rtn(make_tiny, calibration):
    """Evaluated on the calibration tokens: with 128 of them, per-channel maxima of the tiny
    model's random embeddings do not cover unseen tokens (on other tokens per channel is worse)."""
    reference = make_tiny()(calibration)
    per_tensor = make_tiny()
    act_quantize(per_tensor, calibration, 8, "mse", progress=False)
    model = make_tiny()
    rtn_quantize(model, "int8:channel")
    weights_only = model(calibration)
    kernels = {name: np.asarray(module_at(model.layers[0], name).dequantized_kernel())
               for name in LINEAR_NAMES}
    result = act_quantize(model, calibration, 8, "mse", granularity="channel", progress=False)
    both = model(calibration)
    for name in LINEAR_NAMES:  # the packed rtn layers are wrapped as they are
        wrapped = module_at(model.layers[0], name).linear
        np.testing.assert_array_equal(np.asarray(wrapped.dequantized_kernel()), kernels[name])
    threshold = result.block_reports[0]["mlp_hidden"]["threshold"]
    assert threshold.shape == (model.config.ffn_dim,)
    assert result.settings["granularity"] == "channel"
    channel_only = make_tiny()
    act_quantize(channel_only, calibration, 8, "mse", granularity="channel", progress=False)
    assert _relative_change(channel_only(calibration), reference) < \
        _relative_change(per_tensor(calibration), reference)
    assert 0.0 < _relative_change(both, weights_only) < 0.05


def test_act_quantize_bad_input(make_tiny, calibration):
    model = make_tiny()
    with pytest.raises(ValueError, match="observer must be one of"):
        act_quantize(model, calibration, 8, "absmax", progress=False)
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        act_quantize(model, calibration, 16, "minmax", progress=False)
    with pytest.raises(ValueError, match="granularity must be one of"):
        act_quantize(model, calibration, 8, "minmax", granularity="token", progress=False)
    with pytest.raises(ValueError, match="calibration"):
        act_quantize(model, None, 8, "minmax", progress=False)
    assert all(not isinstance(module_at(model.layers[0], n), ActQuantLinear)
               for n in LINEAR_NAMES)


# ---- RTN with an observer ------------------------------------------------------------------
def _weight_sse(model, original):
    total = 0.0
    for index, block in enumerate(model.layers):
        for name in LINEAR_NAMES:
            delta = np.asarray(module_at(block, name).dequantized_kernel()) - original[index][name]
            total += float(np.sum(delta.astype(np.float64) ** 2))
    return total


@pytest.mark.parametrize("spec", ["int4:g32", "int3:g32:asym", "int4:channel"])
def test_rtn_with_mse_observer_has_lower_weight_error(make_tiny, spec):
    original = [{n: np.asarray(module_at(b, n).kernel[...]) for n in LINEAR_NAMES}
                for b in make_tiny().layers]
    errors = {}
    for observer in (None, "mse"):
        model = make_tiny()
        result = rtn_quantize(model, spec, observer=observer)
        assert result.settings["observer"] == observer
        errors[observer] = _weight_sse(model, original)
    assert errors["mse"] < errors[None]
    entry = result.linears["layers.0.mlp.w_down"]
    assert 0.0 < entry.report["clip_ratio_min"] <= entry.report["clip_ratio_mean"] <= 1.0


def test_rtn_without_observer_is_unchanged(make_tiny):
    model = make_tiny()
    kernel = np.asarray(model.layers[1].attn.wo.kernel[...])
    result = rtn_quantize(model, "int4:g32:asym")
    expected = quantize(kernel, "int4:g32:asym", axis=0).dequantize()
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.wo.dequantized_kernel()),
                                  np.asarray(expected))
    assert result.settings == {"weights": "int4:g32:asym", "observer": None}


def test_rtn_observer_bad_input(make_tiny):
    with pytest.raises(ValueError, match="observer must be None or one of"):
        rtn_quantize(make_tiny(), "int4:g32", observer="gptq")
    with pytest.raises(ValueError, match="mean-based"):
        rtn_quantize(make_tiny(), "ternary", observer="mse")
    with pytest.raises(ValueError, match="drop clipR"):
        rtn_quantize(make_tiny(), "int4:g32:clip0.9", observer="mse")


def test_token_sample_stride_visits_every_position(make_tiny):
    from lowbit.ptq.act_quant import act_quantize

    rng = np.random.default_rng(5)
    calibration = rng.integers(0, 128, (8, 32)).astype(np.int32)  # 256 tokens
    result = act_quantize(make_tiny(), calibration, 8, "minmax", sample_tokens=64,
                          progress=False)
    stride = result.settings["stride"]
    assert stride >= 4 and np.gcd(stride, 32) == 1
