import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowbit.core import QArray, QuantSpec, quantize
from lowbit.core.quantize import FP4_CODEBOOK, NF4_CODEBOOK, expand_groups, round_to

INT_SPECS = ["int8", "int4:g32", "int4:g128:asym", "int3:channel", "int2:g16:asym", "int6:channel:asym",
             "int5:g7", "int8:token", "int4:g64:f32", "int3:g128:bf16:asym"]


def _rand(shape, seed=0, dist="normal"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) if dist == "normal" else rng.laplace(size=shape)
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("text", INT_SPECS)
@pytest.mark.parametrize("shape", [(96, 24), (100, 7), (64,)])
def test_int_error_is_at_most_half_a_step(text, shape):
    spec = QuantSpec.parse(text)
    if spec.granularity == "group" and spec.group_size > shape[0]:
        pytest.skip("group larger than axis")
    x = _rand(shape)
    q = quantize(x, spec)
    n = shape[q.axis]
    step = expand_groups(q.scale_values(), spec, q.axis, n)
    err = jnp.abs(q.dequantize() - x)
    # rounding error is at most half a step, with float slack from the stored offset
    assert bool(jnp.all(err <= step / 2 + 1e-5 + 1e-3 * step)), float(jnp.max(err / step))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 70), st.integers(1, 5), st.sampled_from(INT_SPECS + ["nf4:g16", "fp4:g8", "ternary:twn", "binary:channel", "fp8_e4m3:channel"]))
def test_quantize_is_idempotent_on_its_own_grid(rows, cols, text):
    spec = QuantSpec.parse(text)
    if spec.granularity == "group" and spec.group_size > rows:
        return
    x = _rand((rows, cols), seed=rows * 7 + cols)
    q1 = quantize(x, spec)
    d1 = q1.dequantize()
    d2 = quantize(d1, spec).dequantize()
    np.testing.assert_allclose(np.asarray(d2), np.asarray(d1), rtol=2e-3, atol=2e-3 * float(jnp.abs(x).max()))


def test_absmean_ternary_keeps_its_codes_but_not_its_scale():
    # mean|w| of a ternary grid is gamma * (share of non-zeros), so the *values* of BitNet's absmean
    # ternary are not idempotent; its codes are (|c / share| >= 1 rounds back to +-1).
    x = _rand((64, 4))
    q1 = quantize(x, "ternary:f32")
    q2 = quantize(q1.dequantize(), "ternary:f32")
    np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(q1.codes))
    share = float(jnp.mean(q1.codes != 0))
    assert float(q2.scale.reshape(())) == pytest.approx(float(q1.scale.reshape(())) * share, rel=1e-5)


def test_partial_last_group_has_its_own_exact_scale():
    x = _rand((576, 3))
    q = quantize(x, "int4:g128:f32")
    assert q.scale.shape == (5, 3)  # 4 full groups of 128 and one of 64
    np.testing.assert_allclose(np.asarray(q.scale[4]), np.abs(np.asarray(x)[512:]).max(0) / 7, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.scale[0]), np.abs(np.asarray(x)[:128]).max(0) / 7, rtol=1e-6)


def test_asymmetric_uses_min_max_and_reproduces_q4_1_grid():
    x = _rand((64, 4))
    q = quantize(x, "int4:g32:asym:f32")
    xs = np.asarray(x).reshape(2, 32, 4)
    np.testing.assert_allclose(np.asarray(q.zero), xs.min(1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q.scale), (xs.max(1) - xs.min(1)) / 15, rtol=1e-6)
    assert int(q.codes.min()) == 0 and int(q.codes.max()) == 15


def test_token_granularity_scales_each_row():
    x = _rand((5, 64))
    q = quantize(x, "int8:token:f32")
    assert q.axis == 1 and q.scale.shape == (5, 1)
    np.testing.assert_allclose(np.asarray(q.scale[:, 0]), np.abs(np.asarray(x)).max(1) / 127, rtol=1e-6)


def test_binary_is_sign_times_mean_abs():
    x = _rand((64, 8))
    q = quantize(x, "binary:channel:f32")
    xn = np.asarray(x)
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.where(xn >= 0, 1, -1) * np.abs(xn).mean(0), rtol=1e-6)


def test_ternary_absmean_and_twn():
    x = _rand((128, 16), dist="laplace")
    xn = np.asarray(x)
    q = quantize(x, "ternary:f32")
    gamma = np.abs(xn).mean()
    expected = np.clip(np.round(xn / gamma), -1, 1)
    np.testing.assert_array_equal(np.asarray(q.codes), expected)
    assert set(np.unique(np.asarray(q.codes))) <= {-1, 0, 1}
    t = quantize(x, "ternary:f32:twn")
    delta = 0.7 * np.abs(xn).mean()
    keep = np.abs(xn) > delta
    np.testing.assert_array_equal(np.asarray(t.codes), np.sign(xn) * keep)
    np.testing.assert_allclose(float(t.scale.reshape(())), np.abs(xn[keep]).mean(), rtol=1e-5)


@pytest.mark.parametrize("text, book", [("nf4:g64:f32", NF4_CODEBOOK), ("fp4:g64:f32", FP4_CODEBOOK)])
def test_codebook_kinds_pick_the_nearest_level(text, book):
    x = _rand((128, 4))
    q = quantize(x, text)
    xs = np.asarray(x).reshape(2, 64, 4)
    absmax = np.abs(xs).max(1, keepdims=True)
    brute = book[np.abs(xs[..., None] / absmax[..., None] - book).argmin(-1)] * absmax
    np.testing.assert_allclose(np.asarray(q.dequantize()).reshape(2, 64, 4), brute, rtol=1e-6, atol=1e-7)


def test_nf4_double_quant_matches_qlora_overhead_and_stays_close():
    x = _rand((4096, 64))
    single = quantize(x, "nf4:g64:f32").dequantize()
    double = quantize(x, "nf4:g64:dq")
    assert isinstance(double.scale, QArray) and double.scale.codes.dtype == jnp.int8
    rel = float(jnp.linalg.norm(double.dequantize() - single) / jnp.linalg.norm(single))
    assert rel < 0.01


@pytest.mark.parametrize("kind", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_uses_jax_float8_and_saturates(kind):
    x = _rand((256, 4)) * 100
    q = quantize(x, f"{kind}:channel:f32")
    assert q.codes.dtype == {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}[kind]
    assert bool(jnp.all(jnp.isfinite(q.dequantize())))
    rel = float(jnp.abs(q.dequantize() - x).max() / jnp.abs(x).max())
    assert rel < (0.07 if kind == "fp8_e4m3" else 0.13)


def test_clip_ratio_shrinks_range_and_saturates():
    x = _rand((256,))
    q = quantize(x, "int8:clip0.5:f32")
    assert float(q.scale.reshape(())) == pytest.approx(float(jnp.abs(x).max()) * 0.5 / 127, rel=1e-6)
    assert float(jnp.abs(q.dequantize()).max()) <= float(jnp.abs(x).max()) * 0.5 * 1.0001


def test_all_zero_group_gives_zero_scale_and_exact_zeros():
    x = jnp.zeros((64, 3)).at[32:, 1].set(1.0)
    for text in ["int4:g32", "int4:g32:asym", "nf4:g32", "ternary", "fp8_e4m3:g32"]:
        q = quantize(x, text)
        np.testing.assert_allclose(np.asarray(q.dequantize()[:32]), 0.0, atol=0)


def test_works_under_jit_and_vmap():
    x = _rand((64, 8))
    eager = quantize(x, "int4:g16:asym").dequantize()
    jitted = jax.jit(lambda a: quantize(a, "int4:g16:asym").dequantize())(x)
    mapped = jax.vmap(lambda a: quantize(a, "int4:g16:asym").dequantize())(jnp.stack([x, 2 * x]))
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    np.testing.assert_allclose(np.asarray(mapped[0]), np.asarray(eager), rtol=1e-6)
    leaves = jax.tree_util.tree_leaves(quantize(x, "int4:g16:asym"))
    assert len(leaves) == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_an_error(bad):
    x = np.ones((8, 2), np.float32)
    x[3, 1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        quantize(x, "int8")


def test_group_larger_than_axis_and_bad_dtype_are_errors():
    with pytest.raises(ValueError, match="exceeds the length 64"):
        quantize(jnp.ones((64, 2)), "int4:g128")
    with pytest.raises(ValueError, match="floating-point"):
        quantize(jnp.ones((64, 2), jnp.int32), "int4")
    with pytest.raises(ValueError, match="out of range"):
        quantize(jnp.ones((64, 2)), "int4:channel", axis=3)


@pytest.mark.parametrize("text, x_max", [("int8", 1e7), ("int4:g32:asym", 1e6), ("nf4:g32", 1e5),
                                          ("fp8_e4m3", 1e8), ("binary", 1e5), ("ternary", 1e5)])
def test_scales_that_overflow_f16_are_an_error_naming_the_fix(text, x_max):
    x = np.full((64, 64), x_max, np.float32)
    x[0, 0] = -x_max
    with pytest.raises(ValueError, match=f"overflow.*f16.*'{text}:f32'"):
        quantize(x, text)
    q = quantize(x, text + ":f32")  # stored wider, the same values are fine
    assert np.isfinite(np.asarray(q.dequantize())).all()
    assert np.abs(np.asarray(q.dequantize()) - x).max() <= 0.51 * x_max


@pytest.mark.parametrize("shape", [(64, 0), (0,), (0, 8)])
def test_empty_arrays_are_an_error(shape):
    with pytest.raises(ValueError, match=re.escape(f"empty array of shape {shape}")):
        quantize(np.zeros(shape, np.float32), "int8:channel")


@pytest.mark.parametrize("text", ["int8", "int4:g32", "int4:g32:asym", "int8:token", "nf4:g32",
                                  "fp4:g32", "nf4:g32:dq", "fp8_e4m3", "ternary", "binary"])
def test_nan_and_inf_under_jit_come_out_non_finite(text):
    """Under jit nothing can raise: a NaN (or inf) input makes its group's scale NaN (or inf), so
    the element and its group dequantize to NaN or inf, never to finite numbers."""
    for bad in (np.nan, np.inf):
        x = jnp.asarray(_rand((64, 4))).at[3, 1].set(bad)
        out = np.asarray(jax.jit(lambda a: quantize(a, text).dequantize())(x))
        assert not np.isfinite(out[3, 1]), (text, bad)
        if bad != bad:  # NaN
            assert np.isnan(out[3, 1]), text


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_round_to_equals_the_cast_and_survives_compilation(dtype):
    """round_to(x, dtype) is the cast there and back for normal, subnormal, boundary and overflowing
    values, and the compiled program keeps a reduce-precision (XLA on GPU drops a cast pair under jit)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50_000).astype(np.float32) * np.logspace(-12, 6, 50_000, dtype=np.float32)
    tiny = float(jnp.finfo(dtype).smallest_normal)
    edges = [0.0, -0.0, 1e30, -1e30, 65520.0, tiny, tiny * (1 - 2**-12), -tiny * (1 - 2**-12), tiny / 3, 1e-45]
    x = np.concatenate([x, edges]).astype(np.float32)
    got = np.asarray(jax.jit(round_to, static_argnums=1)(jnp.asarray(x), dtype))
    want = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    compiled = jax.jit(round_to, static_argnums=1).lower(jnp.asarray(x), dtype).compile().as_text()
    assert "reduce-precision" in compiled
    assert np.isnan(np.asarray(round_to(jnp.float32(np.nan), dtype)))
