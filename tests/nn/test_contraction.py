import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.nn.contraction import (ConvContraction, DotContraction, EinsumContraction, contraction_from_description,
                                   contraction_of)


def _arr(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _with_random_bias(module, seed):
    if getattr(module, "bias", None) is not None:
        module.bias.set_value(_arr(module.bias.get_value().shape, seed))
    return module


MODULES = {
    "linear": (lambda r: nnx.Linear(12, 5, rngs=r), (3, 4, 12)),
    "linear_no_bias": (lambda r: nnx.Linear(7, 3, use_bias=False, rngs=r), (7,)),
    "general_two_in_two_out": (lambda r: nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=r), (6, 3, 4)),
    "general_axes_out_of_order": (lambda r: nnx.LinearGeneral((2, 4), (3,), axis=(2, 0), rngs=r), (2, 5, 4)),
    "general_middle_axis": (lambda r: nnx.LinearGeneral(6, (2, 3), axis=1, rngs=r), (2, 6, 7)),
    "einsum_heads": (lambda r: nnx.Einsum("btd,dnh->btnh", (8, 2, 3), (2, 3), rngs=r), (2, 5, 8)),
    "einsum_merge_heads": (lambda r: nnx.Einsum("btnh,nhd->btd", (2, 3, 6), (6,), rngs=r), (2, 4, 2, 3)),
    "einsum_ellipsis_transposed_out": (lambda r: nnx.Einsum("...d,fd->f...", (4, 6), (4,), rngs=r), (3, 2, 6)),
    "einsum_kernel_axes_reordered": (lambda r: nnx.Einsum("bj,ojk->bko", (5, 3, 4), (4, 5), rngs=r), (2, 3)),
    "conv_2d_same": (lambda r: nnx.Conv(3, 4, (3, 3), rngs=r), (2, 6, 6, 3)),
    "conv_2d_strided_valid": (lambda r: nnx.Conv(2, 5, (3, 2), strides=(2, 1), padding="VALID", rngs=r), (2, 7, 6, 2)),
    "conv_2d_explicit_pad_dilated": (lambda r: nnx.Conv(3, 4, (2, 2), padding=((1, 0), (2, 1)), kernel_dilation=2,
                                                        rngs=r), (1, 5, 6, 3)),
    "conv_1d_causal": (lambda r: nnx.Conv(4, 3, 3, padding="CAUSAL", rngs=r), (2, 9, 4)),
    "conv_1d_circular_stride": (lambda r: nnx.Conv(2, 3, 3, strides=2, padding="CIRCULAR", rngs=r), (3, 8, 2)),
    "conv_2d_reflect_no_batch": (lambda r: nnx.Conv(2, 3, (3, 3), padding="REFLECT", rngs=r), (5, 5, 2)),
    "conv_2d_two_batch_axes": (lambda r: nnx.Conv(2, 3, (2, 2), input_dilation=2, padding=1, rngs=r), (2, 3, 4, 4, 2)),
    "conv_3d": (lambda r: nnx.Conv(2, 3, (2, 2, 2), padding="VALID", rngs=r), (1, 3, 4, 3, 2)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_rows_times_matrix_plus_bias_is_the_module(name):
    factory, x_shape = MODULES[name]
    module = _with_random_bias(factory(nnx.Rngs(0)), 1)
    c = contraction_of(module)
    kernel = module.kernel.get_value()
    x = _arr(x_shape, 2)
    m = c.matrix(kernel)
    assert m.shape == (c.in_features, c.out_features)
    np.testing.assert_array_equal(np.asarray(c.kernel_from_matrix(m)), np.asarray(kernel))
    rows = c.rows(x)
    assert rows.shape[1] == c.in_features
    y_rows = rows @ m
    if module.bias is not None:
        y_rows = y_rows + c.bias_row(module.bias.get_value())
    y = c.output(y_rows, x)
    expected = module(x)
    assert y.shape == expected.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)
    again = contraction_from_description(json.loads(json.dumps(c.describe())))
    assert again == c


def test_conv_groups_run_channel_fastest_within_each_window_position():
    conv = nnx.Conv(3, 2, (2, 2), rngs=nnx.Rngs(0))
    m = contraction_of(conv).matrix(conv.kernel.get_value())
    k = conv.kernel.get_value()
    # K index = (window row * 2 + window col) * C_in + channel
    np.testing.assert_array_equal(np.asarray(m[1 * 3 + 2]), np.asarray(k[0, 1, 2]))
    np.testing.assert_array_equal(np.asarray(m[3 * 3 + 0]), np.asarray(k[1, 1, 0]))


def test_einsum_k_and_n_follow_the_kernel_axis_order():
    layer = nnx.Einsum("bj,ojk->bko", (5, 3, 4), rngs=nnx.Rngs(0))
    c = contraction_of(layer)
    k = layer.kernel.get_value()  # axes o (output), j (contracted), k (output): N = o * 4 + k
    m = c.matrix(k)
    assert (c.in_features, c.out_features) == (3, 20)
    np.testing.assert_array_equal(np.asarray(m[2, 1 * 4 + 3]), np.asarray(k[1, 2, 3]))


@pytest.mark.parametrize("module, message", [
    (lambda r: nnx.Einsum("bhd,hdk->bhk", (2, 4, 3), rngs=r), "batched matmul"),
    (lambda r: nnx.Einsum("bd,dk->b", (4, 3), rngs=r), "summed away"),
    (lambda r: nnx.Einsum("bd,kl->bdkl", (3, 2), rngs=r), "contracts no axis"),
    (lambda r: nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=r), "feature_group_count=2"),
    (lambda r: nnx.Conv(2, 2, (2,), mask=jnp.ones((2, 2, 2)), rngs=r), "mask"),
    (lambda r: nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=r), "batch_axis"),
    (lambda r: nnx.Linear(4, 3, dot_general=lambda *a, **k: None, rngs=r), "custom dot_general"),
    (lambda r: nnx.Embed(5, 3, rngs=r), "not supported"),
])
def test_unsupported_modules_are_refused_with_the_reason(module, message):
    with pytest.raises(ValueError, match=message):
        contraction_of(module(nnx.Rngs(0)), "net.layer")


class ScaledLinear(nnx.Linear):
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class NamedLinear(nnx.Linear):
    """A subclass that only adds a name keeps nnx.Linear's __call__: supported."""


def test_a_subclass_with_its_own_call_is_refused_and_one_without_is_accepted():
    with pytest.raises(ValueError, match="own __call__"):
        contraction_of(ScaledLinear(4, 3, rngs=nnx.Rngs(0)))
    assert contraction_of(NamedLinear(4, 3, rngs=nnx.Rngs(0))) == DotContraction((4,), (3,), (-1,))


def test_bad_arguments_raise_value_errors():
    c = DotContraction((4,), (3,), (-1,))
    with pytest.raises(ValueError, match="kernel must have shape"):
        c.matrix(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="matrix must have shape"):
        c.kernel_from_matrix(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="sizes"):
        c.rows(jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="padding"):
        ConvContraction((3, 2, 2), 1, "FULL", 1, 1)
    with pytest.raises(ValueError, match="ellipsis"):
        EinsumContraction("bd,...dk->bk", (4, 3))
    with pytest.raises(ValueError, match="kind"):
        contraction_from_description({"kind": "pool"})
