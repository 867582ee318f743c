"""Inference layers on bit-packed weights: PackedLinear, and `freeze(model)` that turns every
fake-quantized layer into one (same outputs as the QAT model, bytes as accounted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.core.packing import PackedArray, pack
from lowbit.core.quantize import SCALE_JNP_DTYPES, QArray, quantize
from lowbit.core.spec import QuantSpec
from lowbit.nn.quant_linear import (QuantLinear, lsq_bounds, quantize_input, rms_normalize,
                                    rounded_step)

from lowbit.kernels.packed_matmul.api import packed_matmul
from lowbit.kernels.packed_matmul.reference import weight_format

TERNARY_FORMATS = ("int2", "base3")


class PackedWeight(nnx.Variable):
    """Packed codes, scales and offsets of a frozen layer (not trained)."""


class QuantizerState(nnx.Variable):
    """A frozen input quantizer's learned value (LSQ step or PACT clip)."""


def _kernel_supports(packed: PackedArray) -> bool:
    """Whether packed_matmul takes this format (int4, 2-bit, binary); others dequantize first."""
    try:
        weight_format(packed)
    except ValueError:
        return False
    return True


class PackedLinear(nnx.Module):
    """y = quantize_input(x) @ dequant(W) (+ bias) with W held packed: [in, out] packed along in.

    The matmul goes through `lowbit.kernels.packed_matmul.api.packed_matmul` (impl="auto") when
    the format is one it takes (int4 / int2 / ternary 2-bit / binary), else it dequantizes W.
    `nbytes` counts codes, scales and offsets exactly; `bits_per_weight` = 8 nbytes / (in*out).
    """

    def __init__(self, packed: PackedArray, *, act_spec: QuantSpec | None = None,
                 act_estimator: str = "identity", act_param=None, input_norm: bool = False,
                 norm_eps: float = 1e-5, bias=None, dtype: Any = None, impl: str = "auto"):
        if not isinstance(packed, PackedArray) or len(packed.shape) != 2 or packed.axis != 0:
            raise ValueError("packed must be a PackedArray of a [in, out] weight packed along axis 0")
        if act_spec is not None and act_estimator in ("lsq", "pact") and act_param is None:
            raise ValueError(f"act_estimator {act_estimator!r} needs its learned act_param")
        self.in_features, self.out_features = packed.shape
        self.spec, self.format = packed.spec, packed.format
        self.data = PackedWeight(packed.data)
        self.scale = PackedWeight(packed.scale)
        self.zero = nnx.data(None if packed.zero is None else PackedWeight(packed.zero))
        self.act_spec, self.act_estimator = act_spec, act_estimator
        self.act_param = nnx.data(None if act_param is None else QuantizerState(jnp.asarray(act_param, jnp.float32)))
        self.input_norm, self.norm_eps = bool(input_norm), norm_eps
        self.bias = nnx.data(None if bias is None else PackedWeight(jnp.asarray(bias)))
        self.dtype, self.impl = dtype, impl
        self.uses_kernel = _kernel_supports(packed)

    @property
    def packed(self) -> PackedArray:
        zero = None if self.zero is None else self.zero.get_value()
        return PackedArray(self.data.get_value(), self.scale.get_value(), zero, self.spec, 0,
                           (self.in_features, self.out_features), self.format)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (codes + scales + offsets; the bias is not counted)."""
        return self.packed.nbytes

    @property
    def bits_per_weight(self) -> float:
        return self.packed.bits_per_weight

    def dequantized_kernel(self) -> jax.Array:
        """The weight the layer multiplies by: [in, out] f32."""
        return self.packed.dequantize(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        if self.input_norm:
            x = rms_normalize(x, self.norm_eps)
        if self.act_spec is not None:
            param = None if self.act_param is None else self.act_param[...]
            x = quantize_input(x, self.act_spec, self.act_estimator, param)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        if self.uses_kernel:
            y = packed_matmul(x, self.packed, impl=self.impl)
        else:
            y = jnp.matmul(x, self.dequantized_kernel().astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def quantize_kernel(layer: QuantLinear) -> QArray:
    """The QArray a QuantLinear's forward uses: codes and scales of its fake-quantized kernel."""
    w = layer.kernel[...].astype(jnp.float32)
    spec = layer.weight_spec
    if layer.estimator != "lsq":
        return quantize(w, spec, axis=0)
    qn, qp = lsq_bounds(spec)
    step = rounded_step(layer.weight_step[...], spec)  # [1 or groups, 1 or out]
    n_in, n_out = w.shape
    if spec.granularity == "group":
        grouped = w.reshape(step.shape[0], spec.group_size, n_out)
        codes = jnp.round(jnp.clip(grouped / step[:, None, :], -qn, qp)).reshape(n_in, n_out)
    else:
        codes = jnp.round(jnp.clip(w / step, -qn, qp))
    scale = step.astype(SCALE_JNP_DTYPES[spec.scale_dtype])
    return QArray(codes.astype(jnp.int8), scale, None, spec, 0)


def pack_layer(layer: QuantLinear, ternary: str = "int2", impl: str = "auto") -> PackedLinear:
    """A PackedLinear whose outputs equal `layer`'s (ternary: 'int2' for the kernel, 'base3' for
    1.6-bit storage; the base-3 form is dequantized before the matmul)."""
    if ternary not in TERNARY_FORMATS:
        raise ValueError(f"ternary must be one of {TERNARY_FORMATS}, got {ternary!r}")
    packed = pack(quantize_kernel(layer), ternary=ternary)
    act_param = None if layer.act_param is None else layer.act_param[...]
    bias = None if layer.bias is None else layer.bias[...]
    return PackedLinear(packed, act_spec=layer.act_spec, act_estimator=layer.act_estimator,
                        act_param=act_param, input_norm=layer.input_norm, norm_eps=layer.norm_eps,
                        bias=bias, dtype=layer.dtype, impl=impl)


@dataclasses.dataclass(frozen=True)
class FreezeSummary:
    """What freeze() did: layers packed, their weights, and their packed bytes."""

    layers: int
    weights: int
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.weights if self.weights else 0.0


def get_child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def set_child(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def module_at(model, path):
    node = model
    for key in path:
        node = get_child(node, key)
    return node


def freeze(model: nnx.Module, *, ternary: str = "int2", impl: str = "auto") -> FreezeSummary:
    """Replace every QuantLinear (BitLinear, BinaryLinear too) in `model`, in place, by a
    PackedLinear; each float kernel is dropped as soon as its layer is packed."""
    if ternary not in TERNARY_FORMATS:
        raise ValueError(f"ternary must be one of {TERNARY_FORMATS}, got {ternary!r}")
    if isinstance(model, QuantLinear):
        raise ValueError("model must contain QuantLinear layers, not be one; use pack_layer(layer)")
    paths = [path for path, node in nnx.iter_graph(model) if isinstance(node, QuantLinear)]
    layers = weights = nbytes = 0
    for path in paths:
        parent = module_at(model, path[:-1])
        frozen = pack_layer(get_child(parent, path[-1]), ternary=ternary, impl=impl)
        set_child(parent, path[-1], frozen)
        layers += 1
        weights += frozen.in_features * frozen.out_features
        nbytes += frozen.nbytes
    return FreezeSummary(layers, weights, nbytes)
