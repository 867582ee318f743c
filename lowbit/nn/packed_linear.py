"""PackedLinear (the PackedLayer of an nnx.Linear), and `freeze(model)` that turns every
fake-quantized layer into its packed layer (same outputs as the QAT model, bytes as accounted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.core.packing import TERNARY_DEFAULT, PackedArray, pack
from lowbit.core.quantize import SCALE_JNP_DTYPES, QArray, quantize
from lowbit.core.spec import QuantSpec
from lowbit.nn.contraction import DotContraction
from lowbit.nn.packed_layer import PackedLayer, PackedWeight, QuantizerState, register_layer
from lowbit.nn.quant_linear import show_signature, QuantLayer, QuantLinear, lsq_bounds, rounded_step

TERNARY_FORMATS = ("int2", "base3")


@register_layer
@show_signature
class PackedLinear(PackedLayer):
    """The PackedLayer of an nnx.Linear: y = quantize_input(x) @ dequant(W) (+ bias), W [in, out]
    packed along in (see PackedLayer for the runtimes and the formats packed_matmul takes)."""

    def __init__(self, packed: PackedArray, *, act_spec: QuantSpec | None = None,
                 act_estimator: str = "identity", act_param=None, input_norm: bool = False,
                 norm_eps: float = 1e-5, bias=None, dtype: Any = None, runtime: str = "packed",
                 impl: str = "auto"):
        if not isinstance(packed, PackedArray) or len(packed.shape) != 2 or packed.axis != 0:
            raise ValueError("packed must be a PackedArray of a [in, out] weight packed along axis 0")
        contraction = DotContraction(packed.shape[:1], packed.shape[1:], (-1,))
        super().__init__(contraction, packed, act_spec=act_spec, act_estimator=act_estimator,
                         act_param=act_param, input_norm=input_norm, norm_eps=norm_eps, bias=bias,
                         dtype=dtype, runtime=runtime, impl=impl)

    @classmethod
    def _build(cls, contraction, packed, **options) -> "PackedLinear":
        return cls(packed, **options)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        return super().__call__(x)


def quantize_kernel(layer: QuantLayer) -> QArray:
    """The QArray a QuantLayer's forward uses: codes and scales of its fake-quantized [K, N]
    matrix (the kernel itself for QuantLinear), groups along K."""
    w = layer.kernel_matrix()
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


def pack_layer(layer: QuantLayer, ternary: str = TERNARY_DEFAULT, impl: str = "auto",
               runtime: str = "packed") -> PackedLayer:
    """The packed layer whose outputs equal `layer`'s: a PackedLinear for a QuantLinear (BitLinear,
    BinaryLinear), else a PackedLayer over the same contraction. ternary: 'int2' (the format
    packed_matmul runs) or 'base3' (1.6-bit storage, dequantized before the matmul)."""
    if ternary not in TERNARY_FORMATS:
        raise ValueError(f"ternary must be one of {TERNARY_FORMATS}, got {ternary!r}")
    if not isinstance(layer, QuantLayer):
        raise ValueError(f"layer must be a QuantLayer (QuantLinear, BitLinear, ...), got {type(layer).__name__}")
    packed = pack(quantize_kernel(layer), ternary=ternary)
    options = dict(act_spec=layer.act_spec, act_estimator=layer.act_estimator,
                   act_param=None if layer.act_param is None else layer.act_param[...],
                   input_norm=layer.input_norm, norm_eps=layer.norm_eps,
                   bias=None if layer.bias is None else layer.bias[...], dtype=layer.dtype,
                   runtime=runtime, impl=impl)
    if isinstance(layer, QuantLinear):
        return PackedLinear(packed, **options)
    return PackedLayer(layer.contraction, packed, **options)


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


def freeze(model: nnx.Module, *, ternary: str = TERNARY_DEFAULT, impl: str = "auto",
           runtime: str = "packed") -> FreezeSummary:
    """Replace every fake-quantized layer in `model` (QuantLayer, QuantLinear, BitLinear,
    BinaryLinear), in place, by its packed layer (see pack_layer; runtime "packed" or "dequant");
    each float kernel is dropped as soon as its layer is packed. A model with no fake-quantized
    layer raises ValueError (run quantize_model(model, rules) first)."""
    if ternary not in TERNARY_FORMATS:
        raise ValueError(f"ternary must be one of {TERNARY_FORMATS}, got {ternary!r}")
    if isinstance(model, QuantLayer):
        raise ValueError("model must contain QuantLayer layers, not be one; use pack_layer(layer)")
    paths = [path for path, node in nnx.iter_graph(model) if isinstance(node, QuantLayer)]
    if not paths:
        packed = sum(isinstance(node, PackedLayer) for _, node in nnx.iter_graph(model))
        hint = f" (its {packed} packed layers are frozen already)" if packed else \
            "; convert it first with quantize_model(model, rules)"
        raise ValueError(f"freeze: {type(model).__name__} has no fake-quantized layer to freeze{hint}")
    layers = weights = nbytes = 0
    for path in paths:
        parent = module_at(model, path[:-1])
        frozen = pack_layer(get_child(parent, path[-1]), ternary=ternary, impl=impl, runtime=runtime)
        set_child(parent, path[-1], frozen)
        layers += 1
        weights += frozen.in_features * frozen.out_features
        nbytes += frozen.nbytes
    return FreezeSummary(layers, weights, nbytes)
