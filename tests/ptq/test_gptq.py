"""GPTQ: equals RTN with H = I, beats it on correlated inputs, act-order, groups, damping."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.quantize import quantize
from lowbit.nn.packed_layer import PackedLayer
from lowbit.ptq.driver import (COUNT, INPUT_GROUPS, XTX, BlockCalibration, embed_calibration,
                               module_at)
from lowbit.ptq.gptq import (check_gptq_spec, gptq_quantize, gptq_quantize_weight,
                             hessian_from_inputs, prepare_hessian)
from lowbit.ptq.result import weight_errors


def _weight(shape=(64, 24), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _correlated_inputs(n=2048, features=64, seed=1):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((features, features)) / np.sqrt(features)
    x = rng.standard_normal((n, features)) @ (np.eye(features) + 2.0 * mix)
    return (x * rng.uniform(0.2, 3.0, features)).astype(np.float32)


def _output_error(x, w, q):
    return float(np.sum((x @ (np.asarray(q.dequantize()) - w)) ** 2))


def _same_qarray(a, b) -> bool:
    """Codes, scales and offsets all equal."""
    if (a.zero is None) != (b.zero is None):
        return False
    if a.zero is not None and not np.array_equal(np.asarray(a.zero), np.asarray(b.zero)):
        return False
    return (np.array_equal(np.asarray(a.codes), np.asarray(b.codes))
            and np.array_equal(np.asarray(a.scale), np.asarray(b.scale)))


@pytest.mark.parametrize("spec", ["int4:g16:asym", "int3:channel", "nf4:g16", "int4:g24"])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_equals_rtn_exactly(spec, act_order):
    w = _weight()
    q, info = gptq_quantize_weight(w, np.eye(64), spec, act_order=act_order)
    assert _same_qarray(q, quantize(w, spec, axis=0))
    assert info == {"damp": 0.01, "dead_inputs": 0}


def test_diagonal_hessian_with_act_order_equals_rtn():
    # No correlations: no error is propagated, so any processing order gives RTN, which also
    # checks that the act-order permutation is undone.
    w = _weight()
    h = np.diag(np.random.default_rng(2).uniform(0.1, 10.0, 64))
    for static in (False, True):
        q, _ = gptq_quantize_weight(w, h, "int3:g16:asym", act_order=True, static_groups=static)
        assert _same_qarray(q, quantize(w, "int3:g16:asym", axis=0))


@pytest.mark.parametrize("spec", ["int4:g16:asym", "int3:channel", "int2:g32:asym"])
def test_output_error_below_rtn_on_correlated_inputs(spec):
    x = _correlated_inputs()
    w = _weight()
    h = hessian_from_inputs(x)
    rtn = _output_error(x, w, quantize(w, spec, axis=0))
    for act_order in (False, True):
        q, _ = gptq_quantize_weight(w, h, spec, act_order=act_order)
        assert _output_error(x, w, q) < rtn
    if spec == "int3:channel":  # per-channel 3-bit is where GPTQ helps most
        q, _ = gptq_quantize_weight(w, h, spec)
        assert _output_error(x, w, q) < 0.75 * rtn


def test_report_error_matches_direct_output_error():
    x = _correlated_inputs()
    w = _weight()
    h = hessian_from_inputs(x)
    q, _ = gptq_quantize_weight(w, h, "int4:g16:asym")
    errors = weight_errors(w, q.dequantize(), h)
    direct = _output_error(x, w, q) / (x.shape[0] * w.shape[1])
    assert errors["output_mse"] == pytest.approx(direct, rel=1e-3)


def test_act_order_helps_when_few_inputs_dominate():
    rng = np.random.default_rng(5)
    x = _correlated_inputs(seed=5)
    x[:, rng.choice(64, 4, replace=False)] *= 20.0
    w = _weight(seed=6)
    h = hessian_from_inputs(x)
    plain, _ = gptq_quantize_weight(w, h, "int3:channel")
    ordered, _ = gptq_quantize_weight(w, h, "int3:channel", act_order=True)
    assert _output_error(x, w, ordered) < _output_error(x, w, plain)


def test_static_groups_keep_rtn_parameters_dynamic_groups_do_not():
    x = _correlated_inputs()
    w = _weight()
    h = hessian_from_inputs(x)
    rtn = quantize(w, "int4:g16:asym", axis=0)
    static, _ = gptq_quantize_weight(w, h, "int4:g16:asym", act_order=True, static_groups=True)
    assert np.array_equal(np.asarray(static.scale), np.asarray(rtn.scale))
    assert np.array_equal(np.asarray(static.zero), np.asarray(rtn.zero))
    dynamic, _ = gptq_quantize_weight(w, h, "int4:g16:asym")
    # The first group is computed before any update; later groups see the updated weights.
    assert np.array_equal(np.asarray(dynamic.scale[0]), np.asarray(rtn.scale[0]))
    assert not np.array_equal(np.asarray(dynamic.scale[1:]), np.asarray(rtn.scale[1:]))
    # Every code lies on the grid of its group: dequantize() reproduces the stored values.
    assert np.all(np.isfinite(np.asarray(dynamic.dequantize())))


def test_block_size_does_not_change_the_result():
    x = _correlated_inputs()
    w = _weight()
    h = hessian_from_inputs(x)
    a, _ = gptq_quantize_weight(w, h, "int4:g16:asym", block_size=128)
    b, _ = gptq_quantize_weight(w, h, "int4:g16:asym", block_size=24)
    np.testing.assert_allclose(np.asarray(a.dequantize()), np.asarray(b.dequantize()), atol=1e-4)


def _with_eigenvalue(value, n=32, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    eig = np.ones(n)
    eig[0] = value
    h = (q * eig) @ q.T
    return (h + h.T) / 2


def test_cholesky_failure_escalates_damping():
    h = _with_eigenvalue(-0.05)  # mean diag ~0.97: 1% damping fails, 10% succeeds
    prepared = prepare_hessian(h)
    assert prepared.damp == pytest.approx(0.1)
    q, info = gptq_quantize_weight(_weight((32, 8)), h, "int4:channel")
    assert info["damp"] == pytest.approx(0.1)
    assert np.all(np.isfinite(np.asarray(q.dequantize())))


def test_indefinite_hessian_is_a_value_error():
    # Positive diagonal, eigenvalue -499: still indefinite at 100 x mean(diag) damping.
    with pytest.raises(ValueError, match="not positive definite"):
        prepare_hessian(np.array([[1.0, 500.0], [500.0, 1.0]]))
    with pytest.raises(ValueError, match="negative diagonal"):
        prepare_hessian(-np.eye(8))


@pytest.mark.parametrize("bad, message", [
    (np.ones((4, 5)), "square"),
    (np.array([[1.0, 2.0], [0.0, 1.0]]), "symmetric"),
    (np.array([[np.nan, 0.0], [0.0, 1.0]]), "NaN"),
])
def test_bad_hessians(bad, message):
    with pytest.raises(ValueError, match=message):
        prepare_hessian(bad)


def test_dead_inputs_are_zeroed():
    x = _correlated_inputs()
    x[:, [3, 40]] = 0.0
    w = _weight()
    q, info = gptq_quantize_weight(w, hessian_from_inputs(x), "int4:g16")
    assert info["dead_inputs"] == 2
    np.testing.assert_array_equal(np.asarray(q.dequantize())[[3, 40]], 0.0)


@pytest.mark.parametrize("spec", ["ternary", "binary:channel", "nf4:g64:dq", "int8:token",
                                  "fp8_e4m3"])
def test_specs_gptq_cannot_do(spec):
    with pytest.raises(ValueError):
        check_gptq_spec(spec)


def test_bad_arguments():
    w = _weight()
    with pytest.raises(ValueError, match="inputs"):
        gptq_quantize_weight(w, np.eye(32), "int4:g16")
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize_weight(w, np.eye(64), "int4:g16", block_size=0)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize_weight(w, np.eye(64), "int4:g128")
    with pytest.raises(ValueError, match="damp"):
        prepare_hessian(np.eye(4), damp=0.0)


def test_model_gptq_first_block_beats_rtn_per_layer(make_tiny, calibration):
    model = make_tiny()
    spec = "int3:g16:asym"
    # The first block's inputs (the embeddings) are the same for GPTQ and RTN.
    inputs = embed_calibration(model, calibration, batch_size=4)
    stats = BlockCalibration(0, model.layers[0], inputs, 4).statistics(
        {g: (XTX, COUNT) for g in INPUT_GROUPS})
    originals = {f"layers.0.{n}": np.asarray(module_at(model.layers[0], n).kernel[...])
                 for n in sum(INPUT_GROUPS.values(), ())}
    result = gptq_quantize(model, calibration, spec, progress=False, batch_size=2)
    assert len(result.linears) == 14 and result.method == "gptq"
    for group, names in INPUT_GROUPS.items():
        h = 2 * stats[group]["xtx"] / stats[group]["count"]
        for name in names:
            path = f"layers.0.{name}"
            w = originals[path]
            rtn = weight_errors(w, quantize(w, spec, axis=0).dequantize(), h)
            assert result.linears[path].report["output_mse"] <= rtn["output_mse"] * (1 + 1e-5)
            layer = module_at(model, path)  # a packed layer holding exactly the result's codes
            assert isinstance(layer, PackedLayer) and not hasattr(layer, "kernel")
            np.testing.assert_array_equal(np.asarray(layer.weight_qarray().codes),
                                          np.asarray(result.linears[path].weight.codes))
            np.testing.assert_array_equal(np.asarray(layer.dequantized_kernel()),
                                          np.asarray(result.linears[path].weight.dequantize()))
    assert np.isfinite(np.asarray(model(jnp.asarray(calibration[:1])))).all()
    assert result.bits_per_weight == pytest.approx(3 + 32 / 16)
