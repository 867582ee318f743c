"""PackedLayer: a Linear / LinearGeneral / Einsum / Conv that holds its weight bit-packed and runs it
through packed_matmul; `packed_layer(module, qarray)` builds one, `layer_state` / `layer_from_state`
turn it into JSON meta + arrays and back (checkpoints without pickles or user code).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.core.hadamard import hadamard_factors, hadamard_transform
from lowbit.core.packing import PackedArray, PackedSubScales, pack
from lowbit.core.quantize import QArray, stat_shape
from lowbit.core.spec import QuantSpec
from lowbit.kernels.packed_matmul.api import packed_matmul
from lowbit.kernels.packed_matmul.reference import weight_format
from lowbit.nn.contraction import Contraction, contraction_from_description, contraction_of
from lowbit.nn.quant_linear import show_signature, ACT_ESTIMATORS, as_spec, check_act_spec, quantize_input, rms_normalize

RUNTIMES = ("packed", "dequant")
INPUT_TRANSFORMS = ("hadamard",)  # x -> x @ H / sqrt(K) over the contracted features (core.hadamard)


class PackedWeight(nnx.Variable):
    """Packed codes, scales and offsets of a frozen layer, and its float bias (not trained)."""


class QuantizerState(nnx.Variable):
    """A frozen input quantizer's learned value (LSQ step or PACT clip)."""


def kernel_supports(packed: PackedArray) -> bool:
    """Whether packed_matmul takes this format: int4 / int2 (sym or asym; group, channel or
    tensor scales; a partial last group too; super-block scales, expanded per call), nf4 / fp4
    code books (double-quantized scales too), ternary in 2-bit fields, binary. Everything else
    (int3/5/6/7 bit planes, int8 bytes, fp8, base-3 ternary) is dequantized per call."""
    try:
        weight_format(packed.expand_scales())
    except ValueError:
        return False
    return True


def check_input_scale(input_scale, in_features: int) -> jax.Array:
    """A finite f32 vector of K = in_features positive multipliers for the input rows."""
    scale = jnp.asarray(input_scale, jnp.float32)
    if scale.shape != (in_features,) or not bool(jnp.all(jnp.isfinite(scale) & (scale > 0))):
        raise ValueError(f"input_scale must be {in_features} finite positive numbers (one per contracted feature K), "
                         f"got shape {tuple(scale.shape)}")
    return scale


def check_input_transform(input_transform, in_features: int) -> str | None:
    """None or a name of INPUT_TRANSFORMS that applies to K = in_features input features."""
    if input_transform is None:
        return None
    if input_transform not in INPUT_TRANSFORMS:
        raise ValueError(f"input_transform must be None or one of {INPUT_TRANSFORMS}, got {input_transform!r}")
    try:
        hadamard_factors(in_features)
    except ValueError as error:
        raise ValueError(f"input_transform 'hadamard' over K = {in_features} features: {error}") from None
    return input_transform


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else jnp.dtype(dtype).name


@show_signature
class PackedLayer(nnx.Module):
    """y = output(quantize_input(rows(x)) @ dequant(W) + bias) with W, the layer's [K, N] matrix
    (see lowbit.nn.contraction), held packed along K.

    input_transform "hadamard" multiplies the rows by the orthogonal H / sqrt(K) first (an online
    rotation, QuaRot's before the down projection: W then holds H^T / sqrt(K) times the original).

    The input quantizer (optional RMS norm, then act_spec) sees the [M, K] rows: 'token'
    granularity means one scale per row (for Conv: per patch). runtime "packed" multiplies through
    packed_matmul (impl: "auto", "pallas", "xla") when `kernel_supports` the format, else it
    dequantizes W per call; runtime "dequant" always dequantizes W and runs a float matmul (the
    research / reference execution). `nbytes` counts codes, scales and offsets exactly (the bias
    is not counted); `bits_per_weight` = 8 nbytes / (K N).
    """

    def __init__(self, contraction: Contraction, packed: PackedArray, *, act_spec=None,
                 act_estimator: str = "identity", act_param=None, input_norm: bool = False,
                 norm_eps: float = 1e-5, bias=None, dtype: Any = None, runtime: str = "packed",
                 impl: str = "auto", input_scale=None, input_transform: str | None = None):
        if not isinstance(contraction, Contraction):
            raise ValueError(f"contraction must be a lowbit.nn.contraction.Contraction, got {type(contraction).__name__}")
        shape = (contraction.in_features, contraction.out_features)
        if not isinstance(packed, PackedArray) or packed.shape != shape or packed.axis != 0:
            raise ValueError(f"packed must be a PackedArray of the [K, N] = {list(shape)} weight matrix packed "
                             f"along axis 0, got {packed!r}")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        act_spec = as_spec(act_spec, "act_spec")
        if act_spec is not None:
            check_act_spec(act_spec, act_estimator)
            if act_estimator in ("lsq", "pact") and act_param is None:
                raise ValueError(f"act_estimator {act_estimator!r} needs its learned act_param")
        elif act_estimator not in ACT_ESTIMATORS:
            raise ValueError(f"act_estimator must be one of {ACT_ESTIMATORS}, got {act_estimator!r}")
        self.contraction = contraction
        self.in_features, self.out_features = shape
        self.spec, self.format = packed.spec, packed.format
        self.data = PackedWeight(packed.data)
        inner = packed.scale if isinstance(packed.scale, (QArray, PackedSubScales)) else None
        self.scale_spec = None if inner is None else inner.spec
        if isinstance(inner, PackedSubScales):  # super-blocks: 6-bit codes, packed, and super-scales
            self.scale = PackedWeight(inner.data)
            self.scale_scale = nnx.data(PackedWeight(inner.super_scale))
            self.scale_zero = nnx.data(None)
        else:
            self.scale = PackedWeight(packed.scale if inner is None else inner.codes)
            self.scale_scale = nnx.data(None if inner is None else PackedWeight(inner.scale))
            self.scale_zero = nnx.data(None if inner is None or inner.zero is None else PackedWeight(inner.zero))
        zero = packed.zero
        self.zero = nnx.data(None if zero is None else
                             PackedWeight(zero.data if isinstance(zero, PackedSubScales) else zero))
        self.zero_scale = nnx.data(PackedWeight(zero.super_scale) if isinstance(zero, PackedSubScales)
                                   else None)
        self.act_spec, self.act_estimator = act_spec, act_estimator
        self.act_param = nnx.data(None if act_param is None else QuantizerState(jnp.asarray(act_param, jnp.float32)))
        self.input_norm, self.norm_eps = bool(input_norm), float(norm_eps)
        self.bias = nnx.data(None if bias is None else PackedWeight(contraction.bias_row(jnp.asarray(bias))))
        self.input_scale = nnx.data(None if input_scale is None else
                                    PackedWeight(check_input_scale(input_scale, contraction.in_features)))
        self.input_transform = check_input_transform(input_transform, contraction.in_features)
        self.dtype, self.runtime, self.impl = dtype, runtime, impl
        self.activations = "f32"  # packed_matmul's activations ("int8": integer codes only); not saved
        self.uses_kernel = runtime == "packed" and kernel_supports(packed)

    @property
    def packed(self) -> PackedArray:
        shape = (self.in_features, self.out_features)
        scale = self.scale.get_value()
        zero = None if self.zero is None else self.zero.get_value()
        if self.spec.super_block is not None:
            groups = stat_shape(shape, self.spec, 0)
            scale = PackedSubScales(scale, self.scale_scale.get_value(), self.scale_spec, 0, groups)
            if zero is not None:
                zero = PackedSubScales(zero, self.zero_scale.get_value(), self.scale_spec, 0, groups)
        elif self.scale_spec is not None:
            inner_zero = None if self.scale_zero is None else self.scale_zero.get_value()
            scale = QArray(scale, self.scale_scale.get_value(), inner_zero, self.scale_spec, 0)
        return PackedArray(self.data.get_value(), scale, zero, self.spec, 0, shape, self.format)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (codes + scales + offsets; the bias is not counted)."""
        return self.packed.nbytes

    @property
    def bits_per_weight(self) -> float:
        return self.packed.bits_per_weight

    def weight_qarray(self) -> QArray:
        """The weight matrix's QArray ([K, N], groups along axis 0), unpacked from the codes."""
        return self.packed.unpack()

    def dequantized_matrix(self) -> jax.Array:
        """The [K, N] matrix the layer multiplies by, in f32."""
        return self.packed.dequantize(jnp.float32)

    def dequantized_kernel(self) -> jax.Array:
        """The dequantized weight in the original module's kernel shape, f32."""
        return self.contraction.kernel_from_matrix(self.dequantized_matrix())

    def set_input_transform(self, input_transform: str | None) -> None:
        """Makes the layer apply (or, with None, stop applying) an online input transform: for a
        caller that applied it outside the layer until now (see lowbit.ptq.rotation)."""
        self.input_transform = check_input_transform(input_transform, self.in_features)

    def prepare_rows(self, rows) -> jax.Array:
        """RMS normalization (if input_norm), the input transform (if any), the input scale (if
        any: rows * input_scale, per K), then input fake quantization (if act_spec) of [M, K]
        rows."""
        if self.input_norm:
            rows = rms_normalize(rows, self.norm_eps)
        if self.input_transform is not None:
            rows = hadamard_transform(rows)
        if self.input_scale is not None:
            rows = rows * self.input_scale[...].astype(rows.dtype)
        if self.act_spec is None:
            return rows
        param = None if self.act_param is None else self.act_param[...]
        return quantize_input(rows, self.act_spec, self.act_estimator, param)

    def __call__(self, x: jax.Array, *, out_sharding=None) -> jax.Array:
        """The module's function of x; out_sharding (nnx.MultiHeadAttention passes it to its
        projections) is accepted and ignored."""
        return self.contraction.output(self.multiply_rows(self.contraction.rows(x), x.dtype), x)

    def multiply_rows(self, rows, dtype=None) -> jax.Array:
        """[M, K] input rows -> [M, N] output rows (prepare_rows, the matmul, the bias), in the
        layer's dtype (else `dtype`, else the rows')."""
        dtype = self.dtype or dtype or rows.dtype
        rows = self.prepare_rows(rows).astype(dtype)
        if self.uses_kernel:
            y = packed_matmul(rows, self.packed.expand_scales(), impl=self.impl, activations=self.activations)
        else:
            y = jnp.matmul(rows, self.dequantized_matrix().astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y

    # ---- checkpoint form ----------------------------------------------------------------
    def layer_state(self) -> tuple[dict, dict]:
        """(JSON-able meta, arrays) from which `layer_from_state` rebuilds this layer exactly."""
        meta = {"class": type(self).__name__, "contraction": self.contraction.describe(),
                "spec": str(self.spec), "format": self.format,
                "scale_spec": None if self.scale_spec is None else str(self.scale_spec),
                "act_spec": None if self.act_spec is None else str(self.act_spec),
                "act_estimator": self.act_estimator, "input_norm": self.input_norm, "norm_eps": self.norm_eps,
                "input_transform": self.input_transform,
                "dtype": _dtype_name(self.dtype), "runtime": self.runtime, "impl": self.impl}
        arrays = {"data": self.data.get_value(), "scale": self.scale.get_value()}
        for name in ("scale_scale", "scale_zero", "zero", "zero_scale", "bias", "act_param", "input_scale"):
            variable = getattr(self, name)
            if variable is not None:
                arrays[name] = variable.get_value()
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> "PackedLayer":
        contraction = contraction_from_description(meta["contraction"])
        shape = (contraction.in_features, contraction.out_features)
        spec = QuantSpec.parse(meta["spec"])
        scale, zero = arrays["scale"], arrays.get("zero")
        if spec.super_block is not None:
            scale_spec, groups = QuantSpec.parse(meta["scale_spec"]), stat_shape(shape, spec, 0)
            scale = PackedSubScales(scale, arrays["scale_scale"], scale_spec, 0, groups)
            if zero is not None:
                zero = PackedSubScales(zero, arrays["zero_scale"], scale_spec, 0, groups)
        elif meta["scale_spec"] is not None:
            scale = QArray(scale, arrays["scale_scale"], arrays.get("scale_zero"),
                           QuantSpec.parse(meta["scale_spec"]), 0)
        packed = PackedArray(arrays["data"], scale, zero, spec, 0, shape, meta["format"])
        dtype = None if meta["dtype"] is None else jnp.dtype(meta["dtype"])
        return cls._build(contraction, packed, act_spec=meta["act_spec"], act_estimator=meta["act_estimator"],
                          act_param=arrays.get("act_param"), input_norm=meta["input_norm"],
                          norm_eps=meta["norm_eps"], bias=arrays.get("bias"), dtype=dtype,
                          runtime=meta["runtime"], impl=meta["impl"],
                          **({"input_scale": arrays["input_scale"]} if "input_scale" in arrays else {}),
                          **({"input_transform": meta["input_transform"]}
                             if meta.get("input_transform") is not None else {}))

    @classmethod
    def _build(cls, contraction: Contraction, packed: PackedArray, **options) -> "PackedLayer":
        return cls(contraction, packed, **options)


LAYER_CLASSES: dict[str, type] = {"PackedLayer": PackedLayer}


def register_layer(cls: type) -> type:
    """Make `layer_from_state` know a layer class (it needs `layer_state()` and
    `from_state(meta, arrays)`); usable as a class decorator."""
    if not (hasattr(cls, "layer_state") and hasattr(cls, "from_state")):
        raise ValueError(f"{cls.__name__} needs a layer_state() method and a from_state(meta, arrays) classmethod")
    LAYER_CLASSES[cls.__name__] = cls
    return cls


def layer_state(layer) -> tuple[dict, dict]:
    """(meta: JSON-able dict, arrays: name -> array) of a registered layer (PackedLayer, PackedLinear, ...)."""
    if type(layer).__name__ not in LAYER_CLASSES or not hasattr(layer, "layer_state"):
        raise ValueError(f"layer must be one of {sorted(LAYER_CLASSES)}, got {type(layer).__name__}")
    return layer.layer_state()


def layer_from_state(meta: dict, arrays: dict):
    """Rebuild a layer from `layer_state`'s (meta, arrays); no user code runs."""
    name = meta.get("class") if isinstance(meta, dict) else None
    if name not in LAYER_CLASSES:
        raise ValueError(f"meta['class'] must be one of {sorted(LAYER_CLASSES)}, got {name!r}")
    return LAYER_CLASSES[name].from_state(meta, {k: jnp.asarray(v) for k, v in arrays.items()})


def packed_layer(module, weight: QArray, *, act_spec=None, runtime: str = "packed",
                 impl: str = "auto", input_scale=None, input_transform: str | None = None) -> PackedLayer:
    """A PackedLayer computing `module`'s function (nnx.Linear, LinearGeneral, Einsum or Conv)
    with `weight`, a QArray of the module's [K, N] matrix (contraction_of(module).matrix(kernel)),
    groups along axis 0. Ternary weights are packed in 2-bit fields (the kernel's format). The
    bias stays float; act_spec (optional) quantizes the input rows with dynamic scales;
    input_scale (optional, [K]) multiplies the input rows first (a per-channel scale that AWQ /
    SmoothQuant could fold nowhere: exact, K multiplies per row); input_transform (optional,
    "hadamard") rotates the input rows before that (the weight must be given in the rotated basis)."""
    contraction = contraction_of(module)
    shape = (contraction.in_features, contraction.out_features)
    if not isinstance(weight, QArray) or weight.shape != shape or weight.axis != 0:
        raise ValueError(f"weight must be a QArray of the [K, N] = {list(shape)} matrix quantized along axis 0, "
                         f"got {weight!r}")
    bias = None if module.bias is None else module.bias.get_value()
    return PackedLayer(contraction, pack(weight), act_spec=act_spec, bias=bias,
                       dtype=module.dtype, runtime=runtime, impl=impl, input_scale=input_scale,
                       input_transform=input_transform)
