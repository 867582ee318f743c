"""Quantize arrays to codes + scales (+ offsets) and back: `quantize(x, spec) -> QArray`.

Scales are shared along one *reduction axis* (the contraction axis of a matmul): axis 0 of a
weight stored [in, out] (Flax layout), the last axis for `token` granularity. Groups of
`group_size` run along that axis; a partial last group gets its own scale, accounted exactly.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.spec import QuantSpec

NF4_CODEBOOK = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)  # QLoRA's NormalFloat4 levels (normal quantiles, normalized to [-1, 1], exact zero)

_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32) / 6.0
FP4_CODEBOOK = np.concatenate([-_E2M1[::-1], _E2M1]).astype(np.float32)  # E2M1, scaled to [-1, 1]

FP8_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
SCALE_JNP_DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
_TERNARY_EPS = 1e-8
_DOUBLE_QUANT_BLOCK = 256


def codebook(spec: QuantSpec) -> np.ndarray:
    """The sorted 16-level code book of an nf4/fp4 spec."""
    return NF4_CODEBOOK if spec.kind == "nf4" else FP4_CODEBOOK


@jax.tree_util.register_pytree_node_class
class QArray:
    """Quantized array: integer (or fp8) `codes` in the logical shape, plus scales.

    Invariant: `dequantize() == codes * expand(scale) + expand(zero)` (nf4/fp4: the code book
    value of each code times the scale), where `scale` and `zero` have the logical shape with
    `axis` shrunk to the number of groups (all axes 1 for tensor granularity). `zero` is the
    real value of code 0 (the group minimum for asymmetric min-max), None when symmetric.
    With double quantization `scale` is itself a QArray over the flattened scales. With super
    blocks (spec.super_block) `scale` and `zero` are QArrays in the scale shape: 6-bit codes
    grouped along `axis` by spec.sub_scale_spec(), times one super-scale per super-block (the
    zero's super-scale is minus the super-min, so codes times it give offsets <= 0).
    """

    def __init__(self, codes, scale, zero, spec: QuantSpec, axis: int):
        self.codes = codes
        self.scale = scale
        self.zero = zero
        self.spec = spec
        self.axis = axis

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero), (self.spec, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"QArray(shape={self.shape}, spec='{self.spec}', axis={self.axis})"

    def scale_values(self) -> jax.Array:
        """The scales as float32 (undoing double quantization or super-blocks), in the stored
        scale shape."""
        if isinstance(self.scale, QArray):
            return self.scale.dequantize().reshape(_stat_shape(self.shape, self.spec, self.axis))
        return self.scale.astype(jnp.float32)

    def zero_values(self) -> jax.Array | None:
        """The offsets as float32 (undoing super-blocks) in the scale shape; None if symmetric."""
        if isinstance(self.zero, QArray):
            return self.zero.dequantize()
        return None if self.zero is None else self.zero.astype(jnp.float32)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return _dequantize(self, jnp.dtype(dtype))


@partial(jax.jit, static_argnums=1)
def _dequantize(q: QArray, dtype) -> jax.Array:
    spec = q.spec
    n = q.shape[q.axis] if q.shape else 1
    scale = expand_groups(q.scale_values(), spec, q.axis, n)
    if spec.kind in ("nf4", "fp4"):
        values = jnp.asarray(codebook(spec))[q.codes.astype(jnp.int32)]
    else:
        values = q.codes.astype(jnp.float32)
    out = values * scale
    if q.zero is not None:
        out = out + expand_groups(q.zero_values(), spec, q.axis, n)
    return out.astype(dtype)


# ---- helpers over the reduction axis -------------------------------------------------------
def reduction_axis(spec: QuantSpec, ndim: int, axis: int | None) -> int:
    """The axis scales are shared along: the last for `token`, else `axis` (default 0)."""
    if ndim == 0:
        return 0
    if spec.granularity == "token":
        return ndim - 1
    axis = 0 if axis is None else axis
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def group_length(spec: QuantSpec, n: int) -> int:
    """Elements per group along the reduction axis (n for channel/token/tensor)."""
    return spec.group_size if spec.granularity == "group" else n


def _stat_shape(shape, spec: QuantSpec, axis: int) -> tuple[int, ...]:
    if not shape or spec.granularity == "tensor":
        return (1,) * len(shape)
    n = shape[axis]
    groups = -(-n // group_length(spec, n))
    return tuple(groups if i == axis else d for i, d in enumerate(shape))


def expand_groups(stat, spec: QuantSpec, axis: int, n: int):
    """Broadcast a per-group statistic back to the full length of the reduction axis."""
    if stat.ndim == 0 or spec.granularity == "tensor":
        return stat
    g = group_length(spec, n)
    return jnp.take(jnp.repeat(stat, g, axis=axis), jnp.arange(n), axis=axis)


def _grouped(x, spec: QuantSpec, axis: int):
    """View x as [..., groups, g] (reduction axis moved last), padding with edge values.

    Returns (view, mask) where mask marks real (non-padding) elements.
    """
    if spec.granularity == "tensor":
        flat = x.reshape(1, -1) if x.ndim else x.reshape(1, 1)
        return flat, jnp.ones(flat.shape, bool)
    xt = jnp.moveaxis(x, axis, -1)
    n = xt.shape[-1]
    g = group_length(spec, n)
    groups = -(-n // g)
    pad = groups * g - n
    if pad:
        xt = jnp.pad(xt, [(0, 0)] * (xt.ndim - 1) + [(0, pad)], mode="edge")
    mask = (jnp.arange(groups * g) < n).reshape(groups, g)
    return xt.reshape(*xt.shape[:-1], groups, g), mask


def _ungroup(v, shape, spec: QuantSpec, axis: int):
    """Inverse of `_grouped` for an array in the grouped view (drops the padding)."""
    if spec.granularity == "tensor":
        return v.reshape(shape)
    n = shape[axis]
    v = v.reshape(*v.shape[:-2], -1)[..., :n]
    return jnp.moveaxis(v, -1, axis)


def _stat_to_shape(stat, shape, spec: QuantSpec, axis: int):
    """[..., groups, 1] statistic in the grouped view -> stored scale shape."""
    if spec.granularity == "tensor":
        return stat.reshape((1,) * len(shape))
    return jnp.moveaxis(stat[..., 0], -1, axis)


def round_to(x, dtype) -> jax.Array:
    """x (float32) rounded to the values of `dtype` (the scales' storage type), kept as float32.

    Codes are computed from these rounded scales so that codes x stored scale is what was meant.
    A plain cast there and back is not enough under jit on a GPU: XLA's excess-precision rewrite
    removes the pair f32 -> f16 -> f32 and the codes then meet unrounded scales (measured on an
    H100: 5e-4 relative error in int4 weights, flipped asymmetric codes). reduce_precision is kept
    but flushes the target's subnormals; f16's (below 2^-14) are rounded onto their 2^-24 grid.
    """
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    if dtype == jnp.float32:
        return x
    info = jnp.finfo(dtype)
    normal = jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    if info.smallest_normal <= jnp.finfo(jnp.float32).smallest_normal:  # bf16: f32's exponent range
        return normal
    step = float(info.smallest_subnormal)  # a power of two: x / step and the product are exact
    subnormal = jnp.round(x / step) * step  # round half to even, as the cast
    return jnp.where(jnp.abs(x) < info.smallest_normal, subnormal, normal)


def round_to_ste(x, dtype) -> jax.Array:
    """round_to(x, dtype) in the forward pass, the gradient passed straight through (trained scales
    that are stored in dtype: Block-AP, E2E)."""
    return x + jax.lax.stop_gradient(round_to(x, dtype) - x)


def _safe(s):
    return jnp.where(s == 0, jnp.ones_like(s), s)


def check_finite(x, name: str = "x") -> None:
    """Raise ValueError if a concrete array holds NaN or inf (tracers are not checked)."""
    if isinstance(x, jax.core.Tracer):
        return
    arr = np.asarray(x)
    if arr.dtype.kind == "f" or arr.dtype == jnp.bfloat16:
        bad = ~np.isfinite(arr.astype(np.float32))
        if bad.any():
            raise ValueError(
                f"{name} holds {int(bad.sum())} non-finite values (NaN or inf); "
                "quantization of non-finite values is undefined"
            )


def validate(spec: QuantSpec, shape, axis: int) -> None:
    """Check that `spec` can quantize an array of `shape` along `axis`."""
    if spec.granularity == "group":
        n = shape[axis] if shape else 1
        if spec.group_size > n:
            raise ValueError(
                f"group_size {spec.group_size} exceeds the length {n} of the reduction axis {axis} "
                f"of an array of shape {tuple(shape)}"
            )
    if spec.double_quant and spec.granularity != "group":
        raise ValueError("double_quant needs group granularity (e.g. 'nf4:g64:dq')")


# ---- quantize ------------------------------------------------------------------------------
def quantize(x, spec: QuantSpec | str, axis: int | None = None, clip_ratio=None) -> QArray:
    """Quantize x with `spec`; `axis` is the reduction axis for channel/group (default 0).

    clip_ratio: optional ratios in (0, 1], one per group, broadcastable to the scale shape
      (`stat_shape`: x's shape with `axis` shrunk to the number of groups, all ones for
      tensor granularity), e.g. from `lowbit.core.calibrate.clip_ratios`. Each group's range
      is multiplied by its ratio before the scale is computed, exactly as the scalar
      `spec.clip` does (asymmetric: [ratio * min, ratio * max]); give one or the other.
      Not defined for binary and ternary (their scales are means, not ranges).
    Non-finite inputs raise ValueError when x is concrete; under jit nothing can raise, and a
    NaN (inf) element makes its group's scale NaN (inf), so the group dequantizes to NaN (NaN or
    inf) while its integer codes stay finite. Scales (and asymmetric offsets) that overflow
    their storage dtype (f16 holds at most 65504, e.g. int8 of |x| > 8.3e6) raise ValueError
    for concrete x; store them wider with scale dtype f32 (e.g. "int8:f32").
    """
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"quantize expects a floating-point array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"cannot quantize an empty array of shape {tuple(x.shape)}")
    check_finite(x)
    axis = reduction_axis(spec, x.ndim, axis)
    validate(spec, x.shape, axis)
    ratio = None
    if clip_ratio is not None:
        ratio = grouped_ratio(check_clip_ratio(clip_ratio, spec, x.shape, axis), x.shape, spec,
                              axis)
    q = _quantize(x.astype(jnp.float32), spec, axis, ratio)
    _check_stored_statistics(q)
    return q


def _check_stored_statistics(q: QArray) -> None:
    """Raise ValueError if a concrete QArray's scales or offsets overflowed their dtype."""
    if isinstance(q.codes, jax.core.Tracer):
        return
    scale = q.scale.scale if isinstance(q.scale, QArray) else q.scale
    zero = q.zero.scale if isinstance(q.zero, QArray) else q.zero
    for name, values in (("scales", scale), ("offsets", zero)):
        if values is not None and not np.isfinite(np.asarray(values, np.float32)).all():
            wider = dataclasses.replace(q.spec, scale_dtype="f32")
            raise ValueError(f"the {name} of spec '{q.spec}' overflow their {q.spec.scale_dtype} "
                             f"storage (the input's largest magnitude is too large for it); "
                             f"store them wider with spec '{wider}'")


def stat_shape(shape, spec: QuantSpec, axis: int) -> tuple[int, ...]:
    """The shape of a per-group statistic (scale, offset, clip ratio) of an array of `shape`."""
    return _stat_shape(tuple(shape), spec, axis)


def check_clip_ratio(clip_ratio, spec: QuantSpec, shape, axis: int):
    """Validates per-group clip ratios for `quantize` and broadcasts them to the scale shape.

    Concrete ratios must be finite and in (0, 1]; tracers are only checked for shape.
    """
    if spec.kind in ("binary", "ternary"):
        raise ValueError(f"clip_ratio is not defined for kind {spec.kind!r} (its scale is a "
                         "mean, not a range)")
    if spec.clip is not None:
        raise ValueError(f"give either spec.clip ({spec.clip:g}) or clip_ratio, not both")
    target = _stat_shape(tuple(shape), spec, axis)
    ratio = jnp.asarray(clip_ratio, jnp.float32)
    try:
        ratio = jnp.broadcast_to(ratio, target)
    except ValueError:
        raise ValueError(f"clip_ratio of shape {tuple(ratio.shape)} does not broadcast to the "
                         f"per-group shape {target} of an array {tuple(shape)} with spec "
                         f"{str(spec)!r} along axis {axis}") from None
    if not isinstance(ratio, jax.core.Tracer):
        values = np.asarray(ratio)
        if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values > 1):
            raise ValueError(f"clip_ratio values must be finite ratios in (0, 1], got range "
                             f"[{values.min():g}, {values.max():g}]")
    return ratio


def grouped_ratio(ratio, shape, spec: QuantSpec, axis: int):
    """Per-group values in the scale shape -> the grouped view's [..., groups, 1] layout."""
    if spec.granularity == "tensor":
        return ratio.reshape(1, 1)
    return jnp.moveaxis(ratio, axis, -1)[..., None]


@partial(jax.jit, static_argnums=(1, 2))
def _quantize(x, spec: QuantSpec, axis: int, ratio=None) -> QArray:
    sdt = SCALE_JNP_DTYPES[spec.scale_dtype]
    xg, mask = _grouped(x, spec, axis)
    if ratio is not None:
        clip = ratio
    else:
        clip = 1.0 if spec.clip is None else spec.clip
    count = mask.sum(-1, keepdims=True)
    zero = None

    if spec.super_block is not None:
        return _quantize_super_blocks(x, xg, clip, spec, axis)
    if spec.kind == "int" and not spec.symmetric:
        lo = xg.min(-1, keepdims=True) * clip
        hi = xg.max(-1, keepdims=True) * clip
        scale = round_to((hi - lo) / spec.qmax, sdt)
        zero_f = round_to(lo, sdt)
        codes = jnp.clip(jnp.round((xg - zero_f) / _safe(scale)), 0, spec.qmax)
        codes = codes.astype(jnp.uint8)
        zero = _stat_to_shape(zero_f.astype(sdt), x.shape, spec, axis)
    elif spec.kind == "int":
        amax = jnp.abs(xg).max(-1, keepdims=True) * clip
        scale = round_to(amax / spec.qmax, sdt)
        codes = jnp.clip(jnp.round(xg / _safe(scale)), -spec.qmax, spec.qmax).astype(jnp.int8)
    elif spec.kind == "binary":
        scale = (jnp.where(mask, jnp.abs(xg), 0).sum(-1, keepdims=True) / count)
        scale = round_to(scale, sdt)
        codes = jnp.where(xg >= 0, 1, -1).astype(jnp.int8)
    elif spec.kind == "ternary" and spec.ternary_method == "absmean":
        gamma = jnp.where(mask, jnp.abs(xg), 0).sum(-1, keepdims=True) / count
        scale = round_to(gamma, sdt)
        denom = jnp.maximum(scale, _TERNARY_EPS)
        codes = jnp.clip(jnp.round(xg / denom), -1, 1).astype(jnp.int8)
    elif spec.kind == "ternary":  # TWN: threshold 0.7 mean|w|, scale = mean of kept |w|
        mag = jnp.where(mask, jnp.abs(xg), 0)
        delta = 0.7 * mag.sum(-1, keepdims=True) / count
        keep = (mag > delta) & mask
        kept = jnp.maximum(keep.sum(-1, keepdims=True), 1)
        scale = round_to(jnp.where(keep, mag, 0).sum(-1, keepdims=True) / kept, sdt)
        codes = (jnp.sign(xg) * (jnp.abs(xg) > delta)).astype(jnp.int8)
    elif spec.kind in ("nf4", "fp4"):
        book = jnp.asarray(codebook(spec))
        scale = (jnp.abs(xg).max(-1, keepdims=True) * clip).astype(jnp.float32)
        if not spec.double_quant:
            scale = round_to(scale, sdt)
        normalized = jnp.clip(xg / _safe(scale), -1.0, 1.0)
        midpoints = (book[1:] + book[:-1]) / 2
        codes = jnp.searchsorted(midpoints, normalized).astype(jnp.uint8)
    else:  # fp8
        dtype = FP8_DTYPES[spec.kind]
        fmax = float(jnp.finfo(dtype).max)
        scale = round_to(jnp.abs(xg).max(-1, keepdims=True) * clip / fmax, sdt)
        codes = jnp.clip(xg / _safe(scale), -fmax, fmax).astype(dtype)

    codes = _ungroup(codes, x.shape, spec, axis)
    scale_out = _stat_to_shape(scale, x.shape, spec, axis)
    if spec.double_quant:
        scale_out = _double_quantize(scale_out)
    else:
        scale_out = scale_out.astype(sdt)
    return QArray(codes, scale_out, zero, spec, axis)


def _quantize_super_blocks(x, xg, clip, spec: QuantSpec, axis: int) -> QArray:
    """int with super-blocks (llama.cpp's k-quants): the float group scales (and mins, offsets
    clamped to <= 0) become 6-bit codes times a per-super-block scale; then the weight codes
    are rounded on that final grid."""
    clip = jnp.asarray(clip, jnp.float32)
    clip = clip[..., 0] if clip.ndim else clip  # per-group ratios: [..., groups, 1] -> [..., groups]
    if spec.symmetric:
        scale_f = jnp.abs(xg).max(-1) * clip / spec.qmax
    else:
        lo = jnp.minimum(xg.min(-1) * clip, 0.0)
        scale_f = (xg.max(-1) * clip - lo) / spec.qmax
    scale_grid, scale_q = _sub_scales(scale_f, spec, axis)
    if spec.symmetric:
        codes = jnp.clip(jnp.round(xg / _safe(scale_grid[..., None])), -spec.qmax, spec.qmax)
        codes, zero_q = codes.astype(jnp.int8), None
    else:
        min_grid, zero_q = _sub_scales(-lo, spec, axis, negate=True)
        codes = jnp.round((xg + min_grid[..., None]) / _safe(scale_grid[..., None]))
        codes = jnp.clip(codes, 0, spec.qmax).astype(jnp.uint8)
    return QArray(_ungroup(codes, x.shape, spec, axis), scale_q, zero_q, spec, axis)


def _sub_scales(values, spec: QuantSpec, axis: int, negate: bool = False):
    """Non-negative per-group values [..., groups] -> (their values on the 6-bit grid, the
    QArray of codes and super-scales in the scale shape); negate stores minus the super-scale
    (offsets = codes x it <= 0)."""
    inner = spec.sub_scale_spec()
    per = inner.group_size
    groups = values.shape[-1]
    supers = -(-groups // per)
    padded = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, supers * per - groups)],
                     mode="edge")  # copies of the last group's value leave each maximum as is
    blocks = padded.reshape(*values.shape[:-1], supers, per)
    sdt = SCALE_JNP_DTYPES[spec.scale_dtype]
    super_scale = round_to(blocks.max(-1, keepdims=True) / inner.qmax, sdt)
    codes = jnp.clip(jnp.round(blocks / _safe(super_scale)), 0, inner.qmax)
    grid = (codes * super_scale).reshape(*values.shape[:-1], -1)[..., :groups]
    codes = codes.astype(jnp.uint8).reshape(*values.shape[:-1], -1)[..., :groups]
    stored = -super_scale[..., 0] if negate else super_scale[..., 0]
    q = QArray(jnp.moveaxis(codes, -1, axis), jnp.moveaxis(stored, -1, axis).astype(sdt), None,
               inner, axis)
    return grid, q


def _double_quantize(scale) -> QArray:
    """QLoRA double quantization: (scale - mean) to int8 in blocks of 256, f32 block scales."""
    flat = scale.reshape(-1)
    mean = flat.mean()
    block = min(_DOUBLE_QUANT_BLOCK, flat.shape[0])
    inner_spec = QuantSpec(kind="int", bits=8, granularity="group", group_size=block, scale_dtype="f32")
    inner = _quantize(flat - mean, inner_spec, 0)
    return QArray(inner.codes, inner.scale, mean.astype(jnp.float32), inner_spec, 0)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
    """Functional form of `QArray.dequantize`."""
    return q.dequantize(dtype)


def quantize_dequantize(x, spec: QuantSpec | str, axis: int | None = None,
                        clip_ratio=None) -> jax.Array:
    """Round trip x through `spec` (no gradient handling; see `lowbit.core.ste` for that)."""
    return quantize(x, spec, axis, clip_ratio).dequantize(jnp.asarray(x).dtype)
