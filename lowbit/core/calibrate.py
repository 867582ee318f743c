"""Clipping observers: pick a clip threshold for |x| (per tensor or per slice) from data with
min-max, a percentile, an MSE search, TensorRT's KL histogram method or ACIQ's analytic
optimum (Laplace / Gaussian), and per-group clip ratios of a weight for `quantize`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.quantize import (_grouped, _quantize, _stat_to_shape, check_finite,
                                  grouped_ratio, reduction_axis, stat_shape, validate)
from lowbit.core.spec import QuantSpec

OBSERVERS = ("minmax", "percentile", "mse", "kl", "aciq_laplace", "aciq_gaussian")
DISTRIBUTIONS = ("laplace", "gaussian")
KL_BINS = 2048  # histogram bins of |x| (TensorRT)
KL_START_BIN = 128  # the first candidate threshold is the upper edge of this many bins
MSE_STEPS = 100  # coarse candidate ratios k / MSE_STEPS, k = 1..MSE_STEPS (1 included)
_FINE_STEPS = 20  # refinement points on each side of the best coarse ratio
_KL_ROW_CHUNK = 256  # histograms per vectorized KL evaluation (bounds memory)


# ---- argument checks -----------------------------------------------------------------------
def check_observer(observer: str) -> str:
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    return observer


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return int(bits)


def check_percentile(percentile: float) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.floating)) \
            or not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
    return float(percentile)


def _check_steps(mse_steps: int) -> int:
    if isinstance(mse_steps, bool) or not isinstance(mse_steps, int) or mse_steps < 2:
        raise ValueError(f"mse_steps must be an integer >= 2, got {mse_steps!r}")
    return mse_steps


def _check_data(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); an observer needs data")
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == jnp.bfloat16):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    check_finite(array, name)
    return array.astype(np.float32)


# ---- ACIQ ----------------------------------------------------------------------------------
def aciq_expected_mse(multiplier: float, bits: int, distribution: str, *,
                      steps: int | None = None) -> float:
    """ACIQ's expected MSE of clipping at alpha = multiplier * scale, divided by scale^2.

    scale is b = E|x - mu| (Laplace) or sigma (Gaussian). Clipping noise: 2 e^(-t) (Laplace);
    (t^2 + 1) erfc(t / sqrt 2) - sqrt(2 / pi) t e^(-t^2 / 2) (Gaussian), t = alpha / scale.
    Rounding noise: Delta^2 / 12 with Delta = 2 alpha / steps, i.e. alpha^2 / (3 4^M) for the
    paper's steps = 2^M; it assumes the density is flat inside each step.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    bits = check_bits(bits)
    steps = 2**bits if steps is None else steps
    t = float(multiplier)
    if distribution == "laplace":
        clipping = 2.0 * math.exp(-t)
    else:
        clipping = ((t * t + 1.0) * math.erfc(t / math.sqrt(2.0))
                    - math.sqrt(2.0 / math.pi) * t * math.exp(-t * t / 2.0))
    return clipping + t * t / (3.0 * steps * steps)


@functools.lru_cache(maxsize=None)
def aciq_multiplier(bits: int, distribution: str, *, steps: int | None = None) -> float:
    """ACIQ's optimal clip alpha / b (Laplace, b = E|x - mu|) or alpha / sigma (Gaussian) for
    `bits`, found by minimizing `aciq_expected_mse` numerically (golden-section search).

    steps: equal steps the range [-alpha, alpha] is cut into. None: 2^bits, the paper's model
    (Banner et al.: 2.83, 3.89, ... for Laplace at 2, 3, ... bits). lowbit's symmetric int grid
    (codes -qmax..qmax, step alpha / qmax) has 2^bits - 2, which `clip_threshold` uses.
    """
    bits = check_bits(bits)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 2):
        raise ValueError(f"steps must be an integer >= 2 (or None for 2**bits), got {steps!r}")

    def cost(t):
        return aciq_expected_mse(t, bits, distribution, steps=steps)

    lo, hi = 1e-3, 40.0  # the cost is unimodal in t on this interval
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fc, fd = cost(c), cost(d)
    while hi - lo > 1e-10:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - golden * (hi - lo)
            fc = cost(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + golden * (hi - lo)
            fd = cost(d)
    return (lo + hi) / 2.0


def int_grid_steps(bits: int) -> int:
    """Steps across [-alpha, alpha] of the symmetric int grid of `bits` (2 qmax = 2^bits - 2)."""
    return 2 * (2 ** (check_bits(bits) - 1) - 1)


# ---- the ratio search shared by the MSE observers ------------------------------------------
def _search_ratios(error_fn: Callable[[jax.Array], jax.Array], shape, steps: int) -> jax.Array:
    """Per-element ratio in (0, 1] minimizing error_fn(ratios) (elementwise, same shape).

    Coarse candidates k / steps (k = steps..1, so ties keep the larger ratio and 1 is always
    tried), then 2 * _FINE_STEPS + 1 points within one coarse step of each element's best.
    Runs under jit (call it inside a jitted function).
    """
    coarse = jnp.arange(steps, 0, -1, dtype=jnp.float32) / steps
    errors = jax.lax.map(lambda r: error_fn(jnp.full(shape, r, jnp.float32)), coarse)
    best_ratio = coarse[jnp.argmin(errors, axis=0)]
    best_error = jnp.min(errors, axis=0)
    offsets = jnp.linspace(1.0, -1.0, 2 * _FINE_STEPS + 1, dtype=jnp.float32) / steps
    floor = 1.0 / (steps * _FINE_STEPS)

    def candidate(offset):
        return jnp.clip(best_ratio + offset, floor, 1.0)

    fine = jax.lax.map(lambda o: error_fn(candidate(o)), offsets)
    fine_index = jnp.argmin(fine, axis=0)
    fine_ratio = jnp.clip(best_ratio + offsets[fine_index], floor, 1.0)
    return jnp.where(jnp.min(fine, axis=0) < best_error, fine_ratio, best_ratio)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _symmetric_mse_ratios(rows, qmax: int, steps: int):
    """rows: [R, n] -> [R] ratio of max|row| minimizing the row's symmetric int MSE."""
    amax = jnp.max(jnp.abs(rows), axis=1)

    def error(ratio):
        scale = ratio * amax / qmax
        safe = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(rows / safe[:, None]), -qmax, qmax) * scale[:, None]
        return jnp.mean((rows - q) ** 2, axis=1)

    return _search_ratios(error, amax.shape, steps)


def symmetric_int_mse(x, threshold, bits: int) -> float:
    """Mean squared error of x through the symmetric int grid of `bits` clipped at threshold."""
    qmax = 2 ** (check_bits(bits) - 1) - 1
    x = np.asarray(x, np.float32)
    scale = float(threshold) / qmax
    if scale <= 0:
        return float(np.mean(x.astype(np.float64) ** 2))
    q = np.clip(np.round(x / scale), -qmax, qmax) * scale
    return float(np.mean((x.astype(np.float64) - q) ** 2))


# ---- KL (TensorRT histogram method) --------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kl_candidates(levels: int):
    """The candidate bin counts i = 128..2048 and how each is merged into `levels` bins:
    m = i // levels bins per merged bin, the last one taking the remainder [(levels-1) m, i).

    Candidates sharing m share their first levels - 1 merged bins, so those are returned once
    per distinct m: (candidates [K], index of each candidate's m [K], last starts [K],
    shared starts [M, levels-1], shared stops [M, levels-1]).
    """
    candidates = np.arange(KL_START_BIN, KL_BINS + 1)
    merged = candidates // levels
    distinct, which = np.unique(merged, return_inverse=True)
    chunk = np.arange(levels - 1)
    shared_starts = distinct[:, None] * chunk[None, :]
    shared_stops = shared_starts + distinct[:, None]
    return candidates, which, merged * (levels - 1), shared_starts, shared_stops


def _xlogx(v):
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)


def _kl_curves(h, candidates, which, last_starts, shared_starts, shared_stops):
    """KL(P || Q) of every candidate for histograms h: [r, 2048] -> [r, K] (inf: ruled out)."""
    n_rows = h.shape[0]
    zeros = np.zeros((n_rows, 1))
    counts = np.concatenate([zeros, np.cumsum(h, axis=1)], axis=1)  # [R, 2049] prefix sums
    nonzero = np.concatenate([zeros, np.cumsum(h > 0, axis=1)], axis=1)
    entropy = np.concatenate([zeros, np.cumsum(_xlogx(h), axis=1)], axis=1)
    total = counts[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        # sum over the shared merged bins of P_c log Q_c (P_c = S_c there): [R, M]
        mass = counts[:, shared_stops] - counts[:, shared_starts]
        support = nonzero[:, shared_stops] - nonzero[:, shared_starts]
        shared = np.where(mass > 0, mass * np.log(mass / np.maximum(support, 1)), 0.0).sum(-1)
        kept = counts[:, candidates]  # [R, K]: mass inside the first i bins
        outliers = total - kept
        last = h[:, candidates - 1]
        last_mass = kept - counts[:, last_starts]
        last_support = (nonzero[:, candidates] - nonzero[:, last_starts]
                        + ((last == 0) & (outliers > 0)))
        p_last = last_mass + outliers
        last_term = np.where(p_last > 0,
                             p_last * np.log(last_mass / np.maximum(last_support, 1)), 0.0)
        cross = shared[:, which] + last_term
        p_log_p = entropy[:, candidates - 1] + _xlogx(last + outliers)
        kl = (p_log_p - cross) / total - np.log(total) + np.log(kept)
    return np.where(np.isnan(kl), np.inf, kl)


def _kl_thresholds(rows: np.ndarray, bits: int) -> np.ndarray:
    """rows: [R, n] -> [R] TensorRT KL thresholds for |x| with 2^(bits-1) levels.

    For each candidate i: P = the first i bins of the 2048-bin histogram of |x| over
    [0, max|x|] with the mass beyond added to bin i-1; Q = those i bins merged into `levels`
    bins, each spread evenly over its nonzero bins of P. The threshold is the upper edge of the
    candidate with the smallest KL(P || Q) (a Q of zero where P > 0 rules a candidate out).
    Everything comes from prefix sums in float64. Needs many values per row to mean much:
    with far fewer values than bins the histogram is sparse and the pick tends to max|x|.
    """
    levels = 2 ** (bits - 1)
    candidates, which, last_starts, shared_starts, shared_stops = _kl_candidates(levels)
    magnitude = np.abs(rows).astype(np.float64)
    amax = magnitude.max(axis=1)
    width = np.where(amax > 0, amax / KL_BINS, 1.0)
    bins = np.minimum((magnitude / width[:, None]).astype(np.int64), KL_BINS - 1)
    n_rows = rows.shape[0]
    offsets = (np.arange(n_rows) * KL_BINS)[:, None]
    hist = np.bincount((bins + offsets).ravel(), minlength=n_rows * KL_BINS)
    h = hist.reshape(n_rows, KL_BINS).astype(np.float64)
    chosen = np.empty(n_rows, np.int64)
    for begin in range(0, n_rows, _KL_ROW_CHUNK):
        kl = _kl_curves(h[begin:begin + _KL_ROW_CHUNK], candidates, which, last_starts,
                        shared_starts, shared_stops)
        chosen[begin:begin + kl.shape[0]] = candidates[np.argmin(kl, axis=1)]
    return (chosen * width * (amax > 0)).astype(np.float32)


# ---- per-row thresholds --------------------------------------------------------------------
def _row_thresholds(rows: np.ndarray, bits: int, observer: str, percentile: float,
                    mse_steps: int) -> np.ndarray:
    """rows: [R, n] float32 -> [R] clip thresholds for |x| (0 for an all-zero row)."""
    magnitude = np.abs(rows)
    amax = magnitude.max(axis=1)
    if observer == "minmax":
        out = amax
    elif observer == "percentile":
        out = np.percentile(magnitude, percentile, axis=1)
    elif observer == "mse":
        ratios = _symmetric_mse_ratios(jnp.asarray(rows), 2 ** (bits - 1) - 1, mse_steps)
        out = np.asarray(ratios) * amax
    elif observer == "kl":
        out = _kl_thresholds(rows, bits)
    else:
        distribution = observer.removeprefix("aciq_")
        multiplier = aciq_multiplier(bits, distribution, steps=int_grid_steps(bits))
        values = rows.astype(np.float64)
        mean = values.mean(axis=1)
        if distribution == "laplace":
            spread = np.abs(values - mean[:, None]).mean(axis=1)
        else:
            spread = values.std(axis=1)
        out = np.minimum(amax, np.abs(mean) + multiplier * spread)
    return np.asarray(out, np.float32)


def clip_threshold(x, bits: int, observer: str, *, axis: int | None = None,
                   percentile: float = 99.99, mse_steps: int = MSE_STEPS) -> np.ndarray:
    """A clip threshold for symmetric quantization of x (values beyond +-threshold saturate).

    axis None: one threshold for all of x, shape []; an int: one per index of that axis
    (per channel), reducing over the others, shape [x.shape[axis]].
    observer: "minmax" max|x|; "percentile" that percentile of |x|; "mse" the ratio of max|x|
    (100 steps, then refined) minimizing the MSE of x on the symmetric int grid of `bits`;
    "kl" TensorRT's method (2048-bin histogram of |x|, candidates from bin 128, 2^(bits-1)
    levels, minimum KL(P || Q)); "aciq_laplace" / "aciq_gaussian" |mean| + ACIQ multiplier x
    E|x - mean| / std, with the multiplier for lowbit's int grid (`aciq_multiplier(bits, d,
    steps=2**bits - 2)`), capped at max|x|. Asymmetric users scale [min, max] by
    threshold / max|x| (what `clip_ratios` does).
    Returns float32 numpy values; an all-zero slice gets 0.
    """
    check_observer(observer)
    bits = check_bits(bits)
    percentile = check_percentile(percentile)
    mse_steps = _check_steps(mse_steps)
    array = _check_data(x, "x")
    if axis is None:
        rows = array.reshape(1, -1)
    else:
        if isinstance(axis, bool) or not isinstance(axis, int) \
                or not -array.ndim <= axis < array.ndim:
            raise ValueError(f"axis must be None or an integer in [-{array.ndim}, "
                             f"{array.ndim}) for x of shape {array.shape}, got {axis!r}")
        rows = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    out = _row_thresholds(rows, bits, observer, percentile, mse_steps)
    return out.reshape(()) if axis is None else out


# ---- per-group clip ratios of a weight -----------------------------------------------------
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _spec_mse_ratios(x, spec: QuantSpec, axis: int, steps: int):
    """Per-group ratio (in the scale shape) minimizing each group's reconstruction squared
    error through `spec`'s own grid (sym/asym, group size, scale dtype)."""
    shape = stat_shape(x.shape, spec, axis)
    _, mask = _grouped(x, spec, axis)

    def error(ratio):
        q = _quantize(x, spec, axis, grouped_ratio(ratio, x.shape, spec, axis))
        err, _ = _grouped((q.dequantize() - x) ** 2, spec, axis)
        total = jnp.where(mask, err, 0.0).sum(-1, keepdims=True)
        return _stat_to_shape(total, x.shape, spec, axis)

    return _search_ratios(error, shape, steps)


def _group_rows(x: np.ndarray, spec: QuantSpec, axis: int) -> list[tuple[np.ndarray, tuple]]:
    """Each group's values as rows, without padding: [(rows [R, g], grouped shape), ...] for
    the full groups and (if any) the partial last group."""
    if spec.granularity == "tensor":
        return [(x.reshape(1, -1), (1, 1))]
    moved = np.moveaxis(x, axis, -1)
    n = moved.shape[-1]
    g = spec.group_size if spec.granularity == "group" else n
    full = n // g
    parts = []
    if full:
        body = moved[..., :full * g].reshape(*moved.shape[:-1], full, g)
        parts.append((body.reshape(-1, g), body.shape[:-1]))
    if n % g:
        tail = moved[..., full * g:]
        parts.append((tail.reshape(-1, n % g), (*moved.shape[:-1], 1)))
    return parts


def clip_ratios(w, spec: QuantSpec | str, observer: str, *, axis: int = 0,
                percentile: float = 99.99, mse_steps: int = MSE_STEPS) -> np.ndarray:
    """Per-group clip ratios in (0, 1] of a weight for `quantize(w, spec, axis, clip_ratio=...)`.

    w: e.g. a kernel [in, out] with groups along axis 0; the result has the scale shape
    (`stat_shape`): [groups, out] for gN, [1, out] per channel, [1, 1] per tensor.
    "mse" searches each group's ratio on the spec's own grid (symmetric or asymmetric, group
    size, scale dtype, nf4/fp4/fp8 code books) minimizing its reconstruction MSE (ratio 1, plain
    min-max, is always a candidate). The other observers give threshold / max|group| with the
    threshold of `clip_threshold` for the group's values and spec.bits; an asymmetric group's
    range becomes [ratio * min, ratio * max], scaled about zero like `spec.clip`.
    All-zero groups get 1.
    """
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec or a spec string, got {type(spec).__name__}")
    check_observer(observer)
    percentile = check_percentile(percentile)
    mse_steps = _check_steps(mse_steps)
    if spec.kind in ("binary", "ternary"):
        raise ValueError(f"clip ratios are not defined for kind {spec.kind!r} (its scale is a "
                         "mean, not a range); use int, nf4, fp4 or fp8")
    if spec.clip is not None:
        raise ValueError(f"spec {str(spec)!r} already fixes a clip ratio; drop clipR to let "
                         f"the {observer!r} observer choose one")
    array = _check_data(w, "w")
    axis = reduction_axis(spec, array.ndim, axis)
    validate(spec, array.shape, axis)
    if observer == "mse":
        ratios = _spec_mse_ratios(jnp.asarray(array), spec, axis, mse_steps)
        return np.asarray(ratios, np.float32)
    parts = []
    for rows, grouped_shape in _group_rows(array, spec, axis):
        amax = np.abs(rows).max(axis=1)
        threshold = _row_thresholds(rows, spec.bits, observer, percentile, mse_steps)
        ratio = np.where(amax > 0, threshold / np.where(amax > 0, amax, 1.0), 1.0)
        parts.append(np.clip(ratio, 1e-6, 1.0).reshape(grouped_shape))
    grouped = np.concatenate(parts, axis=-1)  # [..., groups] with the reduction axis last
    if spec.granularity == "tensor":
        return grouped.reshape((1,) * array.ndim).astype(np.float32)
    return np.moveaxis(grouped, -1, axis).astype(np.float32)
