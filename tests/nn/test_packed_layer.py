import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.core.quantize import quantize
from lowbit.nn.contraction import contraction_of
from lowbit.nn.packed_layer import (PackedLayer, PackedWeight, layer_from_state, layer_state, packed_layer)
from lowbit.nn.packed_linear import PackedLinear


def _arr(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


# K is a multiple of 32 and 64 only for linear_divisible; elsewhere g64 (mostly g32) has a partial last group.
MODULES = {
    "linear": (lambda r: nnx.Linear(100, 6, rngs=r), (2, 3, 100)),
    "linear_divisible": (lambda r: nnx.Linear(128, 6, rngs=r), (5, 128)),
    "general": (lambda r: nnx.LinearGeneral((6, 16), (2, 3), axis=(-2, -1), rngs=r), (4, 6, 16)),
    "einsum": (lambda r: nnx.Einsum("btd,dnh->btnh", (80, 2, 3), (2, 3), rngs=r), (2, 3, 80)),
    "conv": (lambda r: nnx.Conv(12, 5, (3, 3), strides=2, rngs=r), (2, 7, 7, 12)),
}

# spec -> (bytes of codes for K entries of one column, True if it has offsets)
SPECS = {
    "int4:g32": (lambda k: math.ceil(k / 2), False),
    "int4:g64:asym": (lambda k: math.ceil(k / 2), True),
    "int8:channel": (lambda k: k, False),
    "ternary": (lambda k: math.ceil(k / 4), False),
    "binary:channel": (lambda k: math.ceil(k / 8), False),
    "nf4:g32": (lambda k: math.ceil(k / 2), False),
    "int3:g32": (lambda k: 3 * math.ceil(k / 8), False),
}


def _setup(name, spec):
    factory, x_shape = MODULES[name]
    module = factory(nnx.Rngs(0))
    module.bias.set_value(_arr(module.bias.get_value().shape, 1))
    c = contraction_of(module)
    q = quantize(c.matrix(module.kernel.get_value()), spec, axis=0)
    return module, c, q, _arr(x_shape, 2)


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(MODULES))
def test_packed_layer_computes_the_module_with_the_dequantized_weight_and_holds_the_accounted_bytes(name, spec):
    module, c, q, x = _setup(name, spec)
    packed = packed_layer(module, q)
    dequant = packed_layer(module, q, runtime="dequant")
    k, n = c.in_features, c.out_features
    code_bytes, asym = SPECS[spec]
    group = int(spec.split(":g")[1].split(":")[0]) if ":g" in spec else None
    kernel_format = spec.split(":")[0] in ("int4", "nf4", "ternary", "binary")  # partial last groups too
    assert packed.uses_kernel == kernel_format and not dequant.uses_kernel
    y_packed, y_dequant = packed(x), dequant(x)
    np.testing.assert_allclose(np.asarray(y_packed), np.asarray(y_dequant), rtol=1e-5, atol=1e-5)
    module.kernel.set_value(c.kernel_from_matrix(q.dequantize()))  # the float module on the quantized weight
    np.testing.assert_allclose(np.asarray(y_packed), np.asarray(module(x)), rtol=1e-5, atol=1e-5)
    groups = 1 if group is None else math.ceil(k / group)
    if spec == "ternary":
        groups = 1 / n  # one scale per tensor
    expected = code_bytes(k) * n + round(2 * groups * n) * (2 if asym else 1)
    assert packed.nbytes == expected
    assert packed.bits_per_weight == pytest.approx(8 * expected / (k * n))
    held = sum(np.asarray(v).nbytes for v in jax.tree.leaves(nnx.state(packed, PackedWeight)))
    assert held == expected + 4 * n  # the packed weight and the f32 bias, nothing else
    restored = packed.weight_qarray()
    np.testing.assert_array_equal(np.asarray(restored.dequantize()), np.asarray(q.dequantize()))


@pytest.mark.parametrize("spec", ["int4:g64:asym", "nf4:g32:dq", "ternary"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_layer_state_round_trips_exactly_through_json_and_numpy(name, spec):
    module, c, q, x = _setup(name, spec)
    layer = packed_layer(module, q, act_spec="int8:token")
    meta, arrays = layer_state(layer)
    meta2 = json.loads(json.dumps(meta))
    rebuilt = layer_from_state(meta2, {key: np.asarray(v) for key, v in arrays.items()})
    assert type(rebuilt) is PackedLayer and layer_state(rebuilt)[0] == meta
    assert rebuilt.nbytes == layer.nbytes
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(layer(x)))


def test_packed_linear_state_round_trip_keeps_its_class_and_learned_input_step():
    packed = packed_layer(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), quantize(_arr((64, 8), 3), "int4:g32", axis=0))
    linear = PackedLinear(packed.packed, act_spec="int4", act_estimator="lsq", act_param=0.25,
                          bias=packed.bias.get_value())
    meta, arrays = layer_state(linear)
    rebuilt = layer_from_state(json.loads(json.dumps(meta)), arrays)
    assert type(rebuilt) is PackedLinear
    x = _arr((3, 64), 4)
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(linear(x)))


def test_packed_layer_rejects_bad_arguments():
    module = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
    q = quantize(_arr((64, 8), 3), "int4:g32", axis=0)
    with pytest.raises(ValueError, match="runtime must be one of"):
        packed_layer(module, q, runtime="fast")
    with pytest.raises(ValueError, match=r"weight must be a QArray of the \[K, N\] = \[64, 8\]"):
        packed_layer(module, quantize(_arr((8, 64), 3), "int4:channel", axis=0))
    with pytest.raises(ValueError, match="act_spec"):
        packed_layer(module, q, act_spec="int9")
    with pytest.raises(ValueError, match="meta\\['class'\\] must be one of"):
        layer_from_state({"class": "Pickle"}, {})
    with pytest.raises(ValueError, match="layer must be one of"):
        layer_state(module)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_input_scale_multiplies_the_rows_exactly_and_round_trips(name):
    """A packed layer holding Q(diag(s) W) and input_scale 1/s computes rows / s @ Q(diag(s) W): the
    float layer's function up to the weight rounding, and exactly the layer without a scale when s = 1."""
    module, c, q, x = _setup(name, "int8:channel")
    s = jnp.exp(_arr((c.in_features,), 5))
    scaled = quantize(c.matrix(module.kernel.get_value()) * s[:, None], "int8:channel", axis=0)
    layer = packed_layer(module, scaled, input_scale=1.0 / s, runtime="dequant")
    expected = c.output(c.rows(x) / s @ scaled.dequantize() + c.bias_row(module.bias.get_value()), x)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)
    ones = packed_layer(module, q, input_scale=jnp.ones(c.in_features))
    np.testing.assert_array_equal(np.asarray(ones(x)), np.asarray(packed_layer(module, q)(x)))
    meta, arrays = layer_state(layer)
    rebuilt = layer_from_state(json.loads(json.dumps(meta)), {k: np.asarray(v) for k, v in arrays.items()})
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(layer(x)))
    with pytest.raises(ValueError, match="input_scale must be"):
        packed_layer(module, q, input_scale=-jnp.ones(c.in_features))
