import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.core import quantize
from lowbit.nn import BinaryLinear, BitLinear, QuantLinear, calibrate
from lowbit.nn.quant_linear import FixedClip


def _arr(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _grads(layer, x, g):
    """d sum(layer(x) * g) / d(layer params) and / dx."""
    def loss(model, inputs):
        return jnp.sum(model(inputs) * g)
    return nnx.grad(loss, argnums=(0, 1))(layer, x)


def _lsq_elem(v, s, qn, qp):
    vs = v / s
    return np.where(vs <= -qn, -qn, np.where(vs >= qp, qp, np.round(vs) - vs)), (vs > -qn) & (vs < qp)


def test_identity_estimator_gradients_are_straight_through():
    kernel, x, g = _arr((16, 8), 0), _arr((3, 16), 1), _arr((3, 8), 2)
    layer = QuantLinear(16, 8, weight_spec="int4:channel", act_spec="int8:token", kernel=kernel)
    grads, dx = _grads(layer, x, g)
    xq = np.asarray(quantize(x, "int8:token").dequantize())
    wq = np.asarray(quantize(kernel, "int4:channel", axis=0).dequantize())
    np.testing.assert_allclose(np.asarray(layer(x)), xq @ wq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads.kernel[...]), xq.T @ np.asarray(g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(g) @ wq.T, rtol=1e-5, atol=1e-5)


def test_clipped_estimator_zeroes_the_weight_gradient_outside_the_grid():
    kernel, x, g = _arr((32, 4), 0), _arr((5, 32), 1), _arr((5, 4), 2)
    layer = QuantLinear(32, 4, weight_spec="int4:clip0.5:f32", estimator="clipped", kernel=kernel)
    grads, _ = _grads(layer, x, g)
    limit = 0.5 * float(jnp.abs(kernel).max())
    inside = np.abs(np.asarray(kernel)) <= limit
    assert 0 < inside.sum() < inside.size
    expected = (np.asarray(x).T @ np.asarray(g)) * inside
    np.testing.assert_allclose(np.asarray(grads.kernel[...]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_scale", [True, False])
def test_lsq_weight_gradients_match_the_formula(grad_scale):
    kernel, x, g = _arr((24, 6), 0), _arr((4, 24), 1), _arr((4, 6), 2)
    layer = QuantLinear(24, 6, weight_spec="int4:channel:f32", estimator="lsq", kernel=kernel,
                        lsq_grad_scale=grad_scale)
    step = np.asarray(layer.weight_step[...])
    assert step.shape == (1, 6)
    np.testing.assert_allclose(step[0], 2 * np.abs(np.asarray(kernel)).mean(0) / math.sqrt(7), rtol=1e-6)
    grads, _ = _grads(layer, x, g)
    upstream = np.asarray(x).T @ np.asarray(g)  # dL / d(quantized kernel)
    elem, inside = _lsq_elem(np.asarray(kernel), step, 8, 7)
    np.testing.assert_allclose(np.asarray(grads.kernel[...]), upstream * inside, rtol=1e-5, atol=1e-6)
    scale = 1 / math.sqrt(24 * 7) if grad_scale else 1.0
    expected = (upstream * elem).sum(0, keepdims=True) * scale
    np.testing.assert_allclose(np.asarray(grads.weight_step[...]), expected, rtol=1e-4, atol=1e-6)


def test_lsq_group_steps_have_one_value_per_group():
    kernel = _arr((32, 3), 0)
    layer = QuantLinear(32, 3, weight_spec="int4:g8", estimator="lsq", kernel=kernel)
    assert layer.weight_step[...].shape == (4, 3)
    wq = np.asarray(layer.quantized_kernel())
    step = np.asarray(layer.weight_step[...]).astype(np.float16).astype(np.float32)
    codes = wq.reshape(4, 8, 3) / step[:, None, :]
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() >= -8 and codes.max() <= 7


@pytest.mark.parametrize("grad_scale", [True, False])
def test_lsq_input_step_gradient_and_calibration(grad_scale):
    kernel, x, g = _arr((16, 4), 0), _arr((2, 5, 16), 1, 2.0), _arr((2, 5, 4), 2)
    layer = QuantLinear(16, 4, weight_spec="int8:channel", act_spec="int4:f32", estimator="lsq",
                        kernel=kernel, lsq_grad_scale=grad_scale)
    assert layer.act_estimator == "lsq" and layer.needs_calibration
    assert calibrate(layer, x) == 1
    s = float(layer.act_param[...])
    assert s == pytest.approx(2 * float(jnp.abs(x).mean()) / math.sqrt(7), rel=1e-5)
    grads, dx = _grads(layer, x, g)
    wq = np.asarray(layer.quantized_kernel())
    upstream = np.asarray(g) @ wq.T  # dL / d(quantized input)
    elem, inside = _lsq_elem(np.asarray(x), s, 8, 7)
    scale = 1 / math.sqrt(16 * 7) if grad_scale else 1.0
    assert float(grads.act_param[...]) == pytest.approx(float((upstream * elem).sum()) * scale, rel=1e-4)
    np.testing.assert_allclose(np.asarray(dx), upstream * inside, rtol=1e-5, atol=1e-6)


def test_pact_clip_gradient_matches_the_formula():
    kernel, x, g = _arr((16, 4), 0), _arr((3, 16), 1, 2.0), _arr((3, 4), 2)
    layer = QuantLinear(16, 4, weight_spec="int8:channel", act_spec="int4", act_estimator="pact",
                        act_clip_init=1.5, kernel=kernel)
    assert isinstance(layer.act_param, nnx.Param) and float(layer.act_param[...]) == 1.5
    grads, dx = _grads(layer, x, g)
    upstream = np.asarray(g) @ np.asarray(layer.quantized_kernel()).T
    xn = np.asarray(x)
    above, below = xn >= 1.5, xn <= -1.5
    assert above.any() and below.any()
    expected = upstream[above].sum() - upstream[below].sum()
    assert float(grads.act_param[...]) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.where(above | below, 0, upstream), rtol=1e-5, atol=1e-6)
    fixed = QuantLinear(16, 4, weight_spec="int8:channel", act_spec="int4", act_estimator="pact",
                        act_clip_init=1.5, learn_clip=False, kernel=kernel)
    assert isinstance(fixed.act_param, FixedClip)
    np.testing.assert_array_equal(np.asarray(fixed(x)), np.asarray(layer(x)))


def test_pact_data_init_uses_the_aciq_gaussian_clip():
    x = _arr((4, 8, 16), 3, 1.5)
    layer = QuantLinear(16, 4, weight_spec="int8", act_spec="int4", act_estimator="pact",
                        act_clip_init="data", rngs=nnx.Rngs(0))
    calibrate(layer, x)
    assert float(layer.act_param[...]) == pytest.approx(2.55 * float(jnp.std(x)), rel=1e-5)


def test_bitlinear_forward_and_gradient_follow_the_paper():
    kernel, x, g = _arr((32, 8), 0, 0.1), _arr((2, 3, 32), 1, 3.0), _arr((2, 3, 8), 2)
    layer = BitLinear(32, 8, kernel=kernel)
    xn = np.asarray(x, np.float64)
    xn = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-5)
    scale = 127.0 / np.abs(xn).max(-1, keepdims=True)
    xq = np.clip(np.round(xn * scale), -128, 127) / scale
    gamma = np.abs(np.asarray(kernel)).mean()
    wq = np.clip(np.round(np.asarray(kernel) / gamma), -1, 1) * np.float16(gamma)
    np.testing.assert_allclose(np.asarray(layer(x)), xq @ wq, rtol=1e-4, atol=1e-4)
    assert np.unique(np.asarray(layer.quantized_kernel())).size == 3
    grads, _ = _grads(layer, x, g)
    expected = np.einsum("bsi,bso->io", xq, np.asarray(g))  # STE: dL/dW = x_q^T g
    np.testing.assert_allclose(np.asarray(grads.kernel[...]), expected, rtol=1e-4, atol=1e-4)


def test_binary_linear_uses_sign_times_mean_magnitude():
    kernel = _arr((16, 4), 0)
    layer = BinaryLinear(16, 4, kernel=kernel)
    w = np.asarray(kernel)
    expected = np.where(w >= 0, 1.0, -1.0) * np.float32(np.float16(np.abs(w).mean()))
    np.testing.assert_allclose(np.asarray(layer.quantized_kernel()), expected, rtol=1e-6)


@pytest.mark.parametrize("options, message", [
    (dict(weight_spec="int4:g64"), "group_size 64 exceeds"),
    (dict(weight_spec="int4", estimator="pact"), "act_estimator='pact'"),
    (dict(weight_spec="ternary", estimator="lsq"), "symmetric int weight_spec"),
    (dict(weight_spec="int4:g24", estimator="lsq"), "group_size to divide"),
    (dict(weight_spec="int4:token"), "token granularity"),
    (dict(weight_spec="int4", act_spec="int4:token", act_estimator="lsq"), "tensor granularity"),
    (dict(weight_spec="int4", act_spec="int4", act_estimator="pact", act_clip_init=-1.0), "act_clip_init"),
    (dict(weight_spec="int9"), "weight_spec"),
    (dict(weight_spec=None), "weight_spec is required"),
])
def test_bad_layer_options_raise_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        QuantLinear(32, 4, rngs=nnx.Rngs(0), **options)


def test_bitlinear_adds_an_optional_float_bias_after_the_matmul():
    kernel, bias = jax.random.normal(jax.random.key(0), (8, 4)), jnp.arange(4.0)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    plain = BitLinear(8, 4, kernel=kernel)
    biased = BitLinear(8, 4, kernel=kernel, use_bias=True, bias=bias)
    np.testing.assert_allclose(np.asarray(biased(x)), np.asarray(plain(x) + bias), rtol=1e-6, atol=1e-6)


def test_calibrate_rejects_tracing():
    layer = QuantLinear(8, 4, weight_spec="int8", act_spec="int8", estimator="lsq", rngs=nnx.Rngs(0))
    layer._calibrating = True
    with pytest.raises(ValueError, match="eagerly"):
        jax.jit(lambda v: nnx.merge(*nnx.split(layer))(v))(jnp.ones((2, 8)))


def test_public_layer_classes_show_their_real_arguments():
    import inspect

    from lowbit.nn import PackedLayer, PackedLinear, QuantLayer

    assert str(inspect.signature(BinaryLinear)).startswith("(in_features: 'int', out_features: 'int', *, weight_spec='binary'")
    assert "contraction" in inspect.signature(QuantLayer).parameters
    assert list(inspect.signature(PackedLinear).parameters)[0] == "packed"
    assert list(inspect.signature(PackedLayer).parameters)[:2] == ["contraction", "packed"]
    assert "weight_spec" in inspect.signature(QuantLinear).parameters
