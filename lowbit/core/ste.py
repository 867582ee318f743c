"""Straight-through estimators: fake quantization with a chosen gradient, as `jax.custom_vjp`s.

identity: dy/dx = 1.  clipped: dy/dx = 1 inside [dequant(min code), dequant(max code)], else 0.
lsq: learned step size (Esser et al. 2020), step gradient scaled by 1/sqrt(N * Qp).
pact: learned clip alpha (Choi et al. 2018), dy/dalpha = 1 where x >= alpha.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from lowbit.core.quantize import FP8_DTYPES, QArray, expand_groups, quantize
from lowbit.core.spec import QuantSpec

ESTIMATORS = ("identity", "clipped", "lsq", "pact")


def _as_spec(spec) -> QuantSpec:
    return QuantSpec.parse(spec) if isinstance(spec, str) else spec


def _range(q: QArray):
    """Smallest and largest representable values per element (for the clipped estimator)."""
    spec = q.spec
    n = q.shape[q.axis] if q.shape else 1
    scale = expand_groups(q.scale_values(), spec, q.axis, n)
    if spec.kind == "int":
        lo, hi = (0 if not spec.symmetric else -spec.qmax) * scale, spec.qmax * scale
    elif spec.kind in FP8_DTYPES:
        fmax = float(jnp.finfo(FP8_DTYPES[spec.kind]).max)
        lo, hi = -fmax * scale, fmax * scale
    else:  # binary, ternary, nf4, fp4: codes span [-1, 1] times the scale
        lo, hi = -scale, scale
    if q.zero is not None:
        zero = expand_groups(q.zero.astype(jnp.float32), spec, q.axis, n)
        lo, hi = lo + zero, hi + zero
    return lo, hi


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fake_quant_identity(x, spec, axis):
    return quantize(x, spec, axis).dequantize(x.dtype)


def _identity_fwd(x, spec, axis):
    return _fake_quant_identity(x, spec, axis), None


def _identity_bwd(spec, axis, _, g):
    return (g,)


_fake_quant_identity.defvjp(_identity_fwd, _identity_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _fake_quant_clipped(x, spec, axis):
    return quantize(x, spec, axis).dequantize(x.dtype)


def _clipped_fwd(x, spec, axis):
    q = quantize(x, spec, axis)
    lo, hi = _range(q)
    inside = (x >= lo) & (x <= hi)
    return q.dequantize(x.dtype), inside


def _clipped_bwd(spec, axis, inside, g):
    return (jnp.where(inside, g, jnp.zeros_like(g)),)


_fake_quant_clipped.defvjp(_clipped_fwd, _clipped_bwd)


def _int_bounds(spec: QuantSpec) -> tuple[int, int]:
    if spec.kind != "int":
        raise ValueError(f"LSQ and PACT need an int spec, got {spec}")
    return -spec.qmin, spec.qmax  # Qn >= 0, Qp > 0


def _reduce_to(x, shape):
    """Sum x over the axes along which `shape` was broadcast."""
    shape = tuple(shape)
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lsq(v, step, qn, qp):
    vs = v / step
    return jnp.round(jnp.clip(vs, -qn, qp)) * step


def _lsq_fwd(v, step, qn, qp):
    return _lsq(v, step, qn, qp), (v, step)


def _lsq_bwd(qn, qp, res, g):
    v, step = res
    vs = v / step
    below, above = vs <= -qn, vs >= qp
    inside = ~below & ~above
    dv = jnp.where(inside, g, 0.0)
    elem = jnp.where(below, -qn, jnp.where(above, qp, jnp.round(vs) - vs))
    per_step = v.size // max(jnp.size(step), 1)
    grad_scale = 1.0 / math.sqrt(per_step * qp)
    dstep = _reduce_to(g * elem, jnp.shape(step)) * grad_scale
    return dv, dstep.astype(jnp.result_type(step))


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_fake_quant(v, step, spec: QuantSpec | str):
    """LSQ: round(clip(v/s, -Qn, Qp)) * s with a learnable step s (scalar or broadcastable)."""
    qn, qp = _int_bounds(_as_spec(spec))
    return _lsq(v, jnp.asarray(step, v.dtype), qn, qp)


def lsq_init_step(v, spec: QuantSpec | str):
    """The LSQ paper's initial step: 2 mean|v| / sqrt(Qp)."""
    _, qp = _int_bounds(_as_spec(spec))
    return 2.0 * jnp.mean(jnp.abs(v)) / math.sqrt(qp)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pact(x, alpha, levels, signed):
    lo = -alpha if signed else 0.0
    y = jnp.clip(x, lo, alpha)
    step = alpha / levels
    return jnp.round(y / step) * step


def _pact_fwd(x, alpha, levels, signed):
    return _pact(x, alpha, levels, signed), (x, alpha)


def _pact_bwd(levels, signed, res, g):
    x, alpha = res
    above = x >= alpha
    below = (x <= -alpha) if signed else (x < 0)
    dx = jnp.where(above | below, 0.0, g)
    dalpha_elem = jnp.where(above, g, 0.0)
    if signed:
        dalpha_elem = dalpha_elem - jnp.where(below, g, 0.0)
    dalpha = _reduce_to(dalpha_elem, jnp.shape(alpha))
    return dx, dalpha.astype(jnp.result_type(alpha))


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact_fake_quant(x, alpha, spec: QuantSpec | str):
    """PACT: clip to [0, alpha] (asymmetric spec) or [-alpha, alpha] (symmetric), then quantize."""
    spec = _as_spec(spec)
    _int_bounds(spec)
    levels = spec.qmax if spec.symmetric else 2**spec.bits - 1
    return _pact(x, jnp.asarray(alpha, x.dtype), levels, spec.symmetric)


def fake_quant(x, spec: QuantSpec | str, estimator: str = "identity", *, axis=None, step=None, alpha=None):
    """Quantize-dequantize x in the forward pass with the chosen straight-through gradient.

    lsq needs `step`, pact needs `alpha` (both trainable arrays, scalar or broadcastable).
    """
    spec = _as_spec(spec)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "lsq":
        if step is None:
            raise ValueError("estimator 'lsq' needs a step size (step=...)")
        return lsq_fake_quant(x, step, spec)
    if estimator == "pact":
        if alpha is None:
            raise ValueError("estimator 'pact' needs a clip value (alpha=...)")
        return pact_fake_quant(x, alpha, spec)
    if estimator == "identity":
        return _fake_quant_identity(x, spec, axis)
    return _fake_quant_clipped(x, spec, axis)
