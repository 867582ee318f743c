import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core import fake_quant, lsq_fake_quant, lsq_init_step, pact_fake_quant, quantize


def _x(shape=(64, 4), seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


@pytest.mark.parametrize("text", ["int4:channel", "ternary", "binary", "nf4:g32", "fp8_e4m3"])
def test_identity_estimator_passes_the_gradient_and_forward_equals_qdq(text):
    x = _x()
    y, vjp = jax.vjp(lambda a: fake_quant(a, text), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quantize(x, text).dequantize()))
    g = _x(seed=1)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))


def test_clipped_estimator_zeroes_gradient_outside_the_grid():
    x = _x((256,))
    grad = jax.grad(lambda a: fake_quant(a, "int4:clip0.5:f32", "clipped").sum())(x)
    scale = float(jnp.abs(x).max()) * 0.5 / 7
    inside = (np.asarray(x) >= -7 * scale) & (np.asarray(x) <= 7 * scale)
    np.testing.assert_array_equal(np.asarray(grad), inside.astype(np.float32))
    assert 0 < inside.sum() < x.size


def test_lsq_gradients_match_the_paper_formula():
    v = _x((100,), scale=2.0)
    s = jnp.float32(0.3)
    qn, qp = 8, 7
    dv, ds = jax.grad(lambda a, b: lsq_fake_quant(a, b, "int4").sum(), argnums=(0, 1))(v, s)
    vs = np.asarray(v) / 0.3
    inside = (vs > -qn) & (vs < qp)
    np.testing.assert_array_equal(np.asarray(dv), inside.astype(np.float32))
    elem = np.where(vs <= -qn, -qn, np.where(vs >= qp, qp, np.round(vs) - vs))
    expected = elem.sum() / math.sqrt(v.size * qp)
    assert float(ds) == pytest.approx(expected, rel=1e-5)


def test_lsq_per_channel_step_and_init():
    v = _x((32, 3))
    steps = jnp.asarray([[0.1, 0.2, 0.3]])
    ds = jax.grad(lambda b: lsq_fake_quant(v, b, "int4").sum())(steps)
    assert ds.shape == (1, 3)
    vs = np.asarray(v) / np.asarray(steps)
    elem = np.where(vs <= -8, -8, np.where(vs >= 7, 7, np.round(vs) - vs))
    np.testing.assert_allclose(np.asarray(ds)[0], elem.sum(0) / math.sqrt(32 * 7), rtol=1e-5)
    assert float(lsq_init_step(v, "int4")) == pytest.approx(2 * float(jnp.abs(v).mean()) / math.sqrt(7), rel=1e-6)


def test_lsq_step_gradient_agrees_with_finite_differences_of_the_clipped_part():
    # away from rounding boundaries only the clipped elements move with s: d/ds (Qp * s) = Qp
    v = jnp.asarray([5.0, -6.0, 0.0], jnp.float32)
    ds = jax.grad(lambda b: lsq_fake_quant(v, b, "int4").sum())(jnp.float32(0.5))
    fd = (float(lsq_fake_quant(v, 0.5 + 1e-3, "int4").sum()) - float(lsq_fake_quant(v, 0.5 - 1e-3, "int4").sum())) / 2e-3
    assert float(ds) * math.sqrt(3 * 7) == pytest.approx(fd, rel=1e-3)


def test_pact_gradients():
    x = _x((200,), scale=2.0)
    alpha = jnp.float32(1.5)
    dx, da = jax.grad(lambda a, b: pact_fake_quant(a, b, "int4:asym").sum(), argnums=(0, 1))(x, alpha)
    xn = np.asarray(x)
    np.testing.assert_array_equal(np.asarray(dx), ((xn >= 0) & (xn < 1.5)).astype(np.float32))
    assert float(da) == (xn >= 1.5).sum()
    y = pact_fake_quant(x, alpha, "int4:asym")
    assert float(y.min()) == 0.0 and float(y.max()) == pytest.approx(1.5)
    assert len(np.unique(np.asarray(y))) <= 16
    # signed variant: d/dalpha is +1 above alpha and -1 below -alpha; finite difference agrees
    da_signed = jax.grad(lambda b: pact_fake_quant(x, b, "int8").sum())(alpha)
    assert float(da_signed) == (xn >= 1.5).sum() - (xn <= -1.5).sum()


def test_bad_estimator_arguments():
    with pytest.raises(ValueError, match="estimator must be one of"):
        fake_quant(_x(), "int4", "magic")
    with pytest.raises(ValueError, match="step"):
        fake_quant(_x(), "int4", "lsq")
    with pytest.raises(ValueError, match="int spec"):
        lsq_fake_quant(_x(), 0.1, "nf4")
