"""Fake-quantized layers for quantization-aware training: QuantLayer (Linear, LinearGeneral, Einsum,
Conv), QuantLinear (any spec, any estimator), BitLinear (BitNet b1.58), BinaryLinear, and `calibrate`.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.core.quantize import SCALE_JNP_DTYPES, round_to, validate
from lowbit.core.spec import QuantSpec
from lowbit.core.ste import fake_quant, lsq_fake_quant, pact_fake_quant
from lowbit.nn.contraction import Contraction, DotContraction, check_module, contraction_of

WEIGHT_ESTIMATORS = ("identity", "clipped", "lsq")
ACT_ESTIMATORS = ("identity", "clipped", "lsq", "pact")
CLIP_INITS = ("data",)

# ACIQ's mean-squared-error optimal clip for a Gaussian, in standard deviations, for 2..8 bits.
ACIQ_GAUSSIAN_CLIP = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92}
_MIN_STEP = 1e-8


class FixedClip(nnx.Variable):
    """A quantizer parameter that training leaves alone (a fixed activation clip)."""


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x, factor: float):
    """Identity in the forward pass; multiplies the incoming gradient by `factor`."""
    return x


def _scale_gradient_fwd(x, factor):
    return x, None


def _scale_gradient_bwd(factor, _, g):
    return (g * factor,)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def rms_normalize(x, eps: float = 1e-5):
    """x / sqrt(mean(x^2) + eps) over the last axis, with no learnable scale (f32 math)."""
    xf = x.astype(jnp.float32)
    out = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return out.astype(x.dtype)


def as_spec(spec, argument: str) -> QuantSpec | None:
    """None, a QuantSpec or its string form -> QuantSpec | None (ValueError naming the argument)."""
    if spec is None or isinstance(spec, QuantSpec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"{argument} must be a QuantSpec, a spec string such as 'int4:channel', or None; "
                         f"got {spec!r}")
    try:
        return QuantSpec.parse(spec)
    except ValueError as error:
        raise ValueError(f"{argument}: {error}") from None


def lsq_bounds(spec: QuantSpec) -> tuple[int, int]:
    """(Qn, Qp): the LSQ clip range in steps, [-Qn, Qp]."""
    return -spec.qmin, spec.qmax


def weight_step_shape(spec: QuantSpec, in_features: int, out_features: int) -> tuple[int, int]:
    """Shape of the LSQ weight steps for a [in, out] kernel: tensor (1, 1), channel (1, out),
    group (in / group_size, out); it equals the scale shape of `quantize(kernel, spec, axis=0)`."""
    if spec.granularity == "tensor":
        return (1, 1)
    if spec.granularity == "channel":
        return (1, out_features)
    return (in_features // spec.group_size, out_features)


def lsq_weight_init(kernel, spec: QuantSpec):
    """LSQ's initial step, 2 mean|w| / sqrt(Qp), over each tensor, channel or group of [in, out]."""
    _, qp = lsq_bounds(spec)
    k = jnp.abs(kernel.astype(jnp.float32))
    n_in, n_out = k.shape
    if spec.granularity == "tensor":
        mean = k.mean().reshape(1, 1)
    elif spec.granularity == "channel":
        mean = k.mean(axis=0, keepdims=True)
    else:
        mean = k.reshape(n_in // spec.group_size, spec.group_size, n_out).mean(axis=1)
    return 2.0 * mean / math.sqrt(qp)


def rounded_step(step, spec: QuantSpec):
    """A weight step as it is stored: at least 1e-8 and rounded to the spec's scale dtype (f32)."""
    step = jnp.maximum(step.astype(jnp.float32), _MIN_STEP)
    return round_to(step, SCALE_JNP_DTYPES[spec.scale_dtype])


def lsq_quantize_weight(kernel, step, spec: QuantSpec, grad_scale: bool = True):
    """LSQ fake quantization of a [in, out] kernel with per tensor / channel / group steps.

    grad_scale: LSQ's step-gradient scale 1/sqrt(N Qp) (N = weights per step); False removes it.
    """
    _, qp = lsq_bounds(spec)
    n_in, n_out = kernel.shape
    step = rounded_step(step, spec)
    if not grad_scale:
        step = scale_gradient(step, math.sqrt(kernel.size // step.size * qp))
    if spec.granularity == "group":
        groups = n_in // spec.group_size
        grouped = kernel.reshape(groups, spec.group_size, n_out)
        return lsq_fake_quant(grouped, step[:, None, :], spec).reshape(n_in, n_out)
    return lsq_fake_quant(kernel, step, spec)


def quantize_input(x, spec: QuantSpec, estimator: str, param=None, grad_scale: bool = True):
    """Fake-quantize activations x: [..., in] (the same function in QAT and in PackedLinear).

    identity / clipped: dynamic scales from x along its last axis (e.g. per token, 'int8:token').
    lsq: learned step `param` (scalar); its gradient scale is 1/sqrt(in * Qp), one token being one
    example (grad_scale=False removes it). pact: learned clip `param`, [-alpha, alpha] for a
    symmetric spec and [0, alpha] for an asymmetric one.
    """
    if estimator in ("identity", "clipped"):
        return fake_quant(x, spec, estimator, axis=-1)
    if estimator == "lsq":
        _, qp = lsq_bounds(spec)
        step = jnp.maximum(param, _MIN_STEP)
        per_example = x.shape[-1] if x.ndim else 1
        factor = math.sqrt(x.size / per_example) if grad_scale else math.sqrt(x.size * qp)
        return lsq_fake_quant(x, scale_gradient(step, factor), spec)
    if estimator == "pact":
        return pact_fake_quant(x, param, spec)
    raise ValueError(f"act_estimator must be one of {ACT_ESTIMATORS}, got {estimator!r}")


def check_weight_spec(spec: QuantSpec, estimator: str, in_features: int) -> None:
    """Raise ValueError if a [in, out] kernel cannot be fake-quantized with spec and estimator."""
    if estimator not in WEIGHT_ESTIMATORS:
        hint = " (PACT clips activations: use act_estimator='pact')" if estimator == "pact" else ""
        raise ValueError(f"estimator must be one of {WEIGHT_ESTIMATORS}, got {estimator!r}{hint}")
    if spec.granularity == "token":
        raise ValueError(f"weight_spec '{spec}' has token granularity; weights take tensor, channel or group")
    validate(spec, (in_features, 1), 0)
    if estimator == "lsq":
        if spec.kind != "int" or not spec.symmetric:
            raise ValueError(f"estimator 'lsq' needs a symmetric int weight_spec (e.g. 'int4:channel'), got '{spec}'")
        if spec.clip is not None:
            raise ValueError(f"estimator 'lsq' learns the range; weight_spec '{spec}' must not set clip")
        if spec.granularity == "group" and in_features % spec.group_size:
            raise ValueError(f"estimator 'lsq' with weight_spec '{spec}' needs group_size to divide "
                             f"in_features={in_features}")


def check_act_spec(spec: QuantSpec, estimator: str) -> None:
    """Raise ValueError if activations cannot be fake-quantized with spec and estimator."""
    if estimator not in ACT_ESTIMATORS:
        raise ValueError(f"act_estimator must be one of {ACT_ESTIMATORS}, got {estimator!r}")
    if estimator in ("lsq", "pact"):
        if spec.kind != "int":
            raise ValueError(f"act_estimator {estimator!r} needs an int act_spec (e.g. 'int4'), got '{spec}'")
        if spec.granularity != "tensor":
            raise ValueError(f"act_estimator {estimator!r} learns one scalar, so act_spec must have tensor "
                             f"granularity (e.g. 'int4'), got '{spec}'")
        if spec.clip is not None:
            raise ValueError(f"act_estimator {estimator!r} learns the range; act_spec '{spec}' must not set clip")


class QuantLayer(nnx.Module):
    """A fake-quantized nnx.Linear / LinearGeneral / Einsum / Conv for quantization-aware training.

    contraction: how the layer contracts its kernel (lowbit.nn.contraction); the kernel is
      quantized as its [K, N] matrix, groups along K (for Conv: window x input channels, channel
      fastest). kernel / bias: the float master Params in the original module's shapes (adopted,
      not copied); the bias stays float and is added after the matmul.
    weight_spec / estimator: how the kernel is quantized: identity or clipped straight-through,
      or lsq (learned step sizes, one per tensor / output column / group, init 2 mean|w|/sqrt(Qp)).
    act_spec / act_estimator (default: estimator, or identity for lsq weights when the act_spec
      is not tensor-wise): quantization of the input rows [M, K] (rows(x); 'token' = one scale per
      row): identity / clipped with dynamic scales, lsq (learned step, init by `calibrate` to
      2 mean|x|/sqrt(Qp)), or pact (learned clip).
    act_clip_init: PACT's initial alpha: a number (default 10.0, a large clip that training
      shrinks, as in the paper) or "data" (ACIQ Gaussian clip of the first batch, set by
      `calibrate`). learn_clip=False keeps the clip fixed (a FixedClip variable).
    lsq_grad_scale: LSQ's step-gradient scale (on by default; off for the ablation).
    input_norm / norm_eps: RMS-normalize each input row first, with no learnable scale (BitNet).
    dtype / precision: the matmul's dtype (None: from x and the kernel) and precision.
    """

    def __init__(self, contraction: Contraction, kernel, *, weight_spec, bias=None, act_spec=None,
                 estimator: str = "identity", act_estimator: str | None = None,
                 act_clip_init: float | str = 10.0, learn_clip: bool = True,
                 lsq_grad_scale: bool = True, input_norm: bool = False, norm_eps: float = 1e-5,
                 dtype: Any = None, precision: Any = None):
        if not isinstance(contraction, Contraction):
            raise ValueError(f"contraction must be a lowbit.nn.contraction.Contraction, got {type(contraction).__name__}")
        k, n = contraction.in_features, contraction.out_features
        spec = as_spec(weight_spec, "weight_spec")
        if spec is None:
            raise ValueError("weight_spec is required (e.g. 'int4:channel', 'ternary'); keep the float layer for float")
        check_weight_spec(spec, estimator, k)
        aspec = as_spec(act_spec, "act_spec")
        if act_estimator is None:
            act_estimator = "identity" if estimator == "lsq" and aspec is not None \
                and aspec.granularity != "tensor" else estimator
        if aspec is not None:
            check_act_spec(aspec, act_estimator)
            if act_estimator == "pact" and not (act_clip_init in CLIP_INITS or (
                    isinstance(act_clip_init, (int, float)) and not isinstance(act_clip_init, bool)
                    and act_clip_init > 0)):
                raise ValueError(f"act_clip_init must be a positive number or 'data', got {act_clip_init!r}")
        self.contraction = contraction
        self.in_features, self.out_features = k, n
        self.weight_spec, self.act_spec = spec, aspec
        self.estimator, self.act_estimator = estimator, act_estimator
        self.act_clip_init, self.learn_clip = act_clip_init, bool(learn_clip)
        self.lsq_grad_scale, self.input_norm, self.norm_eps = bool(lsq_grad_scale), bool(input_norm), norm_eps
        self.dtype, self.precision = dtype, precision
        self._calibrating = False

        if not isinstance(kernel, nnx.Param):
            kernel = nnx.Param(jnp.asarray(kernel))
        if tuple(kernel.get_value().shape) != tuple(contraction.kernel_shape):
            raise ValueError(f"kernel must have shape {tuple(contraction.kernel_shape)}, "
                             f"got {tuple(kernel.get_value().shape)}")
        self.kernel = kernel
        if bias is not None:
            if not isinstance(bias, nnx.Param):
                bias = nnx.Param(jnp.asarray(bias))
            if bias.get_value().size != n:
                raise ValueError(f"bias must have {n} entries (one per output), got shape {tuple(bias.get_value().shape)}")
        self.bias = nnx.data(bias)

        weight_step = None
        if estimator == "lsq":
            weight_step = nnx.Param(lsq_weight_init(self.kernel_matrix(), spec))
        self.weight_step = nnx.data(weight_step)
        act_param = None
        if aspec is not None and act_estimator == "lsq":
            _, qp = lsq_bounds(aspec)
            # Placeholder for unit-variance inputs (E|x| = sqrt(2/pi)); calibrate() sets the paper's value.
            act_param = nnx.Param(jnp.asarray(2.0 * math.sqrt(2 / math.pi) / math.sqrt(qp), jnp.float32))
        elif aspec is not None and act_estimator == "pact":
            alpha = 1.0 if act_clip_init == "data" else float(act_clip_init)
            act_param = (nnx.Param if self.learn_clip else FixedClip)(jnp.asarray(alpha, jnp.float32))
        self.act_param = nnx.data(act_param)

    # Default options a rule naming this class applies to every module type (BitLinear: BitNet's).
    defaults: dict = {}

    @classmethod
    def from_module(cls, module, *, path: str = "module", **options) -> "QuantLayer":
        """A QuantLayer that adopts an nnx.Linear / LinearGeneral / Einsum / Conv's kernel and bias
        Params (no copy); options as for the constructor. ValueError naming `path` if unsupported."""
        contraction = contraction_of(module, path)
        return cls(contraction, module.kernel, bias=module.bias, dtype=module.dtype,
                   precision=module.precision, **options)

    @property
    def needs_calibration(self) -> bool:
        """Whether `calibrate` sets an initial value here (LSQ input step, PACT clip 'data')."""
        return self.act_spec is not None and (self.act_estimator == "lsq" or (
            self.act_estimator == "pact" and self.act_clip_init == "data"))

    def kernel_matrix(self) -> jax.Array:
        """The float kernel as its [K, N] matrix, f32."""
        return self.contraction.matrix(self.kernel[...].astype(jnp.float32))

    def quantized_matrix(self) -> jax.Array:
        """The fake-quantized [K, N] matrix in f32 (with its straight-through gradient)."""
        w = self.kernel_matrix()
        if self.estimator == "lsq":
            return lsq_quantize_weight(w, self.weight_step[...], self.weight_spec, self.lsq_grad_scale)
        return fake_quant(w, self.weight_spec, self.estimator, axis=0)

    def quantized_kernel(self) -> jax.Array:
        """The fake-quantized kernel in its own shape, f32 ([in, out] for QuantLinear)."""
        return self.contraction.kernel_from_matrix(self.quantized_matrix())

    def prepare_input(self, rows) -> jax.Array:
        """RMS normalization (if input_norm) then input fake quantization (if act_spec) of [M, K] rows."""
        if self.input_norm:
            rows = rms_normalize(rows, self.norm_eps)
        if self._calibrating:
            self._observe(rows)
        if self.act_spec is None:
            return rows
        param = None if self.act_param is None else self.act_param[...]
        return quantize_input(rows, self.act_spec, self.act_estimator, param, self.lsq_grad_scale)

    def _observe(self, x) -> None:
        if isinstance(x, jax.core.Tracer):
            raise ValueError("calibrate() runs the model eagerly: call it outside jit / grad")
        if not self.needs_calibration:
            return
        xf = jnp.asarray(x, jnp.float32)
        if self.act_estimator == "lsq":
            _, qp = lsq_bounds(self.act_spec)
            value = 2.0 * jnp.mean(jnp.abs(xf)) / math.sqrt(qp)
        else:
            value = ACIQ_GAUSSIAN_CLIP[self.act_spec.bits] * jnp.std(xf)
        self.act_param.set_value(jnp.maximum(value, _MIN_STEP).astype(jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        rows = self.prepare_input(self.contraction.rows(x))
        w = self.quantized_matrix()
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.get_value().dtype)
        y = jnp.matmul(rows.astype(dtype), w.astype(dtype), precision=self.precision)
        if self.bias is not None:
            y = y + self.contraction.bias_row(self.bias[...]).astype(dtype)
        return self.contraction.output(y, x)


class QuantLinear(QuantLayer):
    """Drop-in for nnx.Linear that fake-quantizes its weights (and optionally its inputs): the
    QuantLayer of a [in, out] kernel, groups along in (see QuantLayer for every option).

    kernel / bias: existing Params (or arrays) to adopt without copying (used by the rules);
    otherwise kernel_init(rngs.params(), (in, out)) and a zero bias when use_bias.
    """

    def __init__(self, in_features: int, out_features: int, *, weight_spec, act_spec=None,
                 estimator: str = "identity", act_estimator: str | None = None,
                 act_clip_init: float | str = 10.0, learn_clip: bool = True,
                 lsq_grad_scale: bool = True, input_norm: bool = False, norm_eps: float = 1e-5,
                 use_bias: bool = False, dtype: Any = None, param_dtype: Any = jnp.float32,
                 precision: Any = None, kernel_init=nnx.initializers.lecun_normal(),
                 kernel=None, bias=None, rngs: nnx.Rngs | None = None):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if kernel is None:
            if rngs is None:
                raise ValueError("rngs is required when no kernel is given")
            kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        elif not isinstance(kernel, nnx.Param):
            kernel = nnx.Param(jnp.asarray(kernel))
        if tuple(kernel.get_value().shape) != (in_features, out_features):
            raise ValueError(f"kernel must have shape [in, out] = {(in_features, out_features)}, "
                             f"got {tuple(kernel.get_value().shape)}")
        if use_bias:
            if bias is None:
                bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
            elif not isinstance(bias, nnx.Param):
                bias = nnx.Param(jnp.asarray(bias))
            if tuple(bias.get_value().shape) != (out_features,):
                raise ValueError(f"bias must have shape [out] = ({out_features},), got {tuple(bias.get_value().shape)}")
        super().__init__(DotContraction((in_features,), (out_features,), (-1,)), kernel,
                         weight_spec=weight_spec, bias=bias if use_bias else None, act_spec=act_spec,
                         estimator=estimator, act_estimator=act_estimator, act_clip_init=act_clip_init,
                         learn_clip=learn_clip, lsq_grad_scale=lsq_grad_scale, input_norm=input_norm,
                         norm_eps=norm_eps, dtype=dtype, precision=precision)
        self.use_bias, self.param_dtype = bool(use_bias), param_dtype

    @classmethod
    def from_linear(cls, linear: nnx.Linear, **options) -> "QuantLinear":
        """A quantized layer that adopts `linear`'s kernel (and bias) Params without copying them."""
        if not isinstance(linear, nnx.Linear):
            raise ValueError(f"linear must be an nnx.Linear, got {type(linear).__name__}")
        check_module(linear, options.pop("path", "linear"))
        bias = linear.bias if linear.use_bias else None
        return cls(linear.in_features, linear.out_features, kernel=linear.kernel, bias=bias,
                   use_bias=linear.use_bias, dtype=linear.dtype, param_dtype=linear.param_dtype,
                   precision=linear.precision, **options)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        return super().__call__(x)


BITNET_DEFAULTS = {"weight_spec": "ternary", "act_spec": "int8:token:f32", "input_norm": True}


class BitLinear(QuantLinear):
    """BitNet b1.58's linear: RMSNorm without a learnable scale on the input (input_norm), absmean
    ternary weights per tensor, per-token absmax int8 activations (scale 127 / max|x|), identity
    STE (x + stop_gradient(q(x) - x)). BitNet drops biases; use_bias=True (for models that have
    them) keeps the bias in float and adds it after the matmul. Other weight specs (e.g. 'binary')
    are accepted; every other option is QuantLinear's.
    """

    defaults = BITNET_DEFAULTS

    def __init__(self, in_features: int, out_features: int, *, weight_spec="ternary",
                 act_spec="int8:token:f32", input_norm: bool = True, use_bias: bool = False,
                 estimator: str = "identity", act_estimator: str | None = None,
                 act_clip_init: float | str = 10.0, learn_clip: bool = True,
                 lsq_grad_scale: bool = True, norm_eps: float = 1e-5, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init=nnx.initializers.lecun_normal(), kernel=None, bias=None,
                 rngs: nnx.Rngs | None = None):
        super().__init__(in_features, out_features, weight_spec=weight_spec, act_spec=act_spec,
                         input_norm=input_norm, use_bias=use_bias, estimator=estimator,
                         act_estimator=act_estimator, act_clip_init=act_clip_init, learn_clip=learn_clip,
                         lsq_grad_scale=lsq_grad_scale, norm_eps=norm_eps, dtype=dtype,
                         param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
                         kernel=kernel, bias=bias, rngs=rngs)


class BinaryLinear(BitLinear):
    """BitLinear with 1-bit weights: sign(w) times mean|w| per tensor (BitNet's binary layer);
    every other option is BitLinear's."""

    defaults = {**BITNET_DEFAULTS, "weight_spec": "binary"}

    def __init__(self, in_features: int, out_features: int, *, weight_spec="binary",
                 act_spec="int8:token:f32", input_norm: bool = True, use_bias: bool = False,
                 estimator: str = "identity", act_estimator: str | None = None,
                 act_clip_init: float | str = 10.0, learn_clip: bool = True,
                 lsq_grad_scale: bool = True, norm_eps: float = 1e-5, dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init=nnx.initializers.lecun_normal(), kernel=None, bias=None,
                 rngs: nnx.Rngs | None = None):
        super().__init__(in_features, out_features, weight_spec=weight_spec, act_spec=act_spec,
                         input_norm=input_norm, use_bias=use_bias, estimator=estimator,
                         act_estimator=act_estimator, act_clip_init=act_clip_init, learn_clip=learn_clip,
                         lsq_grad_scale=lsq_grad_scale, norm_eps=norm_eps, dtype=dtype,
                         param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
                         kernel=kernel, bias=bias, rngs=rngs)


def show_signature(cls: type) -> type:
    """Make help(cls) / inspect.signature(cls) show cls.__init__'s real arguments (nnx's
    metaclass otherwise shows a parent's or (*args, **kwargs))."""
    init = inspect.signature(cls.__init__)
    cls.__signature__ = init.replace(parameters=list(init.parameters.values())[1:])
    return cls


for _cls in (QuantLayer, QuantLinear, BitLinear, BinaryLinear):
    show_signature(_cls)


def calibrate(model: nnx.Module, batch) -> int:
    """Set the data-initialized quantizer values (LSQ input steps, PACT clips with 'data')
    from one eager forward pass of `model(batch)`; returns how many layers were set."""
    layers = [node for _, node in nnx.iter_graph(model)
              if isinstance(node, QuantLayer) and node.needs_calibration]
    if not layers:
        return 0
    for layer in layers:
        layer._calibrating = True
    try:
        model(batch)
    finally:
        for layer in layers:
            layer._calibrating = False
    return len(layers)
