"""GPTQ (arXiv 2210.17323): column-by-column quantization that pushes each column's rounding
error onto the not-yet-quantized columns through the inverse Hessian of the layer inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.quantize import QArray, SCALE_JNP_DTYPES, codebook, group_length, quantize
from lowbit.core.spec import QuantSpec
from lowbit.ptq.driver import COUNT, XTX, BlockInputs, llama_block_inputs, run_blocks
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors
from lowbit.ptq.rtn import parse_weight_spec
from lowbit.ptq.targets import check_runtime, install_packed, module_at

GPTQ_KINDS = ("int", "nf4", "fp4")
DAMP_ESCALATION = 10.0  # each failed Cholesky multiplies the relative damping by this


def check_gptq_spec(spec: QuantSpec | str) -> QuantSpec:
    """The spec if GPTQ can run it: int (sym or asym), nf4 or fp4, with tensor, channel or group
    granularity along the input axis and plain scales (no double quantization)."""
    spec = parse_weight_spec(spec)
    if spec.kind not in GPTQ_KINDS:
        raise ValueError(f"GPTQ supports weight kinds {GPTQ_KINDS}, got {spec.kind!r} "
                         f"(spec {str(spec)!r}); use rtn for the other kinds")
    if spec.double_quant:
        raise ValueError(f"GPTQ does not support double-quantized scales (spec {str(spec)!r})")
    if spec.super_block is not None and spec.clip is not None:
        raise ValueError(f"GPTQ takes no clip ratio with super-block scales (spec {str(spec)!r}); "
                         "drop clipR")
    return spec


def hessian_from_inputs(x) -> jax.Array:
    """H = 2 X^T X / n for layer inputs x: [tokens, features] -> [features, features] f32."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty [tokens, features] array, got shape "
                         f"{x.shape}")
    return 2.0 * (x.T @ x) / x.shape[0]


@dataclasses.dataclass(frozen=True)
class PreparedHessian:
    """A layer-input Hessian made ready for GPTQ (shared by the linears that share the input).

    inverse_cholesky: [in, in] f32 upper factor U of (H_perm + damp * mean(diag) I)^-1 = U^T U,
      in processing order; order: processing position -> input index (act-order permutation
      or identity); dead: [in] bool inputs with H_ii = 0; damp: the relative damping that
      made the Cholesky factorizations succeed.
    """

    inverse_cholesky: np.ndarray
    order: np.ndarray
    dead: np.ndarray
    damp: float

    @property
    def size(self) -> int:
        return self.order.shape[0]


@jax.jit
def _inverse_cholesky(h, damp):
    """Upper U with (h + damp I)^-1 = U^T U; NaN where the factorization fails.

    With J the reversal permutation and J (h + damp I) J = L L^T, U = J L^-1 J: one Cholesky
    and one triangular inverse instead of factorizing, inverting and factorizing again.
    """
    n = h.shape[0]
    damped = h + damp * jnp.eye(n, dtype=h.dtype)
    lower = jnp.linalg.cholesky(damped[::-1, ::-1])
    inverse = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=h.dtype), lower=True)
    return inverse[::-1, ::-1]


def prepare_hessian(hessian, *, damp: float = 0.01, act_order: bool = False,
                    max_escalations: int = 4) -> PreparedHessian:
    """Dead inputs (H_ii = 0) get H_ii = 1; with act_order the inputs are ordered by
    descending diag(H); damp * mean(diag H) is added to the diagonal and multiplied by 10 each
    time a Cholesky factorization fails (at most max_escalations times); factorizations in f32.

    Raises ValueError for a non-square, non-finite or asymmetric matrix, a negative diagonal,
    or one that stays indefinite after every escalation.
    """
    if not (isinstance(damp, (int, float)) and damp > 0 and np.isfinite(damp)):
        raise ValueError(f"damp must be a positive number (a fraction of mean(diag H)), "
                         f"got {damp!r}")
    h = np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] == 0:
        raise ValueError(f"hessian must be a square [in, in] matrix, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("hessian holds NaN or inf values")
    scale = max(float(np.abs(h).max()), 1e-30)
    if float(np.abs(h - h.T).max()) > 1e-4 * scale:
        raise ValueError("hessian must be symmetric (it is 2 X^T X / n of the layer inputs)")
    h = (h + h.T) / 2
    diag = np.diag(h).copy()
    if (diag < 0).any():
        raise ValueError(f"hessian has {int((diag < 0).sum())} negative diagonal entries; it is "
                         "not positive semi-definite")
    dead = diag == 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    h = h[np.ix_(order, order)]
    h = jnp.asarray(h, jnp.float32)
    mean_diag = float(np.mean(np.diag(np.asarray(h))))
    ratio = float(damp)
    for _ in range(max_escalations + 1):
        upper = np.asarray(_inverse_cholesky(h, jnp.float32(ratio * mean_diag)))
        if np.isfinite(upper).all() and (np.diag(upper) > 0).all():
            return PreparedHessian(inverse_cholesky=upper, order=order.astype(np.int32),
                                   dead=dead, damp=ratio)
        ratio *= DAMP_ESCALATION
    raise ValueError(f"hessian is not positive definite even with damping "
                     f"{ratio / DAMP_ESCALATION:g} x mean(diag H) after {max_escalations} "
                     "escalations; check the calibration inputs")


def _safe(s):
    return jnp.where(s == 0, jnp.ones_like(s), s)


def _code_dtype(spec: QuantSpec):
    return jnp.int8 if spec.kind == "int" and spec.symmetric else jnp.uint8


def _round_column(w, scale, zero, spec: QuantSpec):
    """Codes and dequantized values of one column w: [out] on the grid (scale, zero): [out],
    with exactly the arithmetic of lowbit.core.quantize."""
    if spec.kind == "int" and not spec.symmetric:
        codes = jnp.clip(jnp.round((w - zero) / _safe(scale)), 0, spec.qmax).astype(jnp.uint8)
        return codes, codes.astype(jnp.float32) * scale + zero
    if spec.kind == "int":
        codes = jnp.clip(jnp.round(w / _safe(scale)), -spec.qmax, spec.qmax).astype(jnp.int8)
        return codes, codes.astype(jnp.float32) * scale
    book = jnp.asarray(codebook(spec))
    normalized = jnp.clip(w / _safe(scale), -1.0, 1.0)
    codes = jnp.searchsorted((book[1:] + book[:-1]) / 2, normalized).astype(jnp.uint8)
    return codes, book[codes.astype(jnp.int32)] * scale


def _parameter_unit(spec: QuantSpec, n_in: int) -> int:
    """Rows whose grid is fixed at once: a super-block (its group scales share a super-scale),
    else a group (n_in for channel / tensor granularity)."""
    return spec.super_block or group_length(spec, n_in)


def _grid_parameters(q: QArray, n_out: int):
    """The grid of a QArray quantized along axis 0 as f32 [groups, out] (scale, zero) plus, for
    super-blocks, the 6-bit codes [groups, out] of scales and mins (uint8) and their super-scales
    [super-blocks, out] (zeros otherwise)."""
    scale = jnp.broadcast_to(q.scale_values(), (q.scale_values().shape[0], n_out))
    zero = q.zero_values()
    zero = jnp.zeros_like(scale) if zero is None else jnp.broadcast_to(zero, scale.shape)
    if q.spec.super_block is None:
        codes, supers = jnp.zeros(scale.shape, jnp.uint8), jnp.zeros((1, n_out), jnp.float32)
        return scale, zero, codes, codes, supers, supers
    min_codes, min_super = (jnp.zeros(scale.shape, jnp.uint8), jnp.zeros_like(q.scale.scale,
                                                                            jnp.float32))
    if q.zero is not None:
        min_codes, min_super = q.zero.codes, q.zero.scale.astype(jnp.float32)
    return (scale, zero, q.scale.codes, min_codes, q.scale.scale.astype(jnp.float32), min_super)


def _unit_parameters(values, spec: QuantSpec):
    """_grid_parameters of one parameter unit's rows values: [rows, out]."""
    return _grid_parameters(quantize(values, spec, axis=0), values.shape[1])


def _weight_qarray(codes, params, spec: QuantSpec, n_groups: int) -> QArray:
    """The QArray of GPTQ's codes [in, out] and its grid parameters (see _grid_parameters)."""
    scale, zero, scale_codes, min_codes, supers, min_supers = params
    dtype = SCALE_JNP_DTYPES[spec.scale_dtype]
    if spec.super_block is not None:
        inner = spec.sub_scale_spec()
        n_supers = -(-n_groups // inner.group_size)
        scale_q = QArray(scale_codes[:n_groups], supers[:n_supers].astype(dtype), None, inner, 0)
        zero_q = None if spec.symmetric else QArray(min_codes[:n_groups],
                                                     min_supers[:n_supers].astype(dtype), None,
                                                     inner, 0)
        return QArray(codes, scale_q, zero_q, spec, 0)
    scale, zero = scale[:n_groups], zero[:n_groups]
    if spec.granularity == "tensor":
        scale, zero = scale[:1, :1], zero[:1, :1]
    return QArray(codes, scale.astype(dtype), None if spec.symmetric else zero.astype(dtype),
                  spec, 0)


@functools.partial(jax.jit, static_argnames=("spec", "block_size", "static_groups"))
def _gptq_columns(weight, inv_chol, order, static_params, *, spec: QuantSpec,
                  block_size: int, static_groups: bool):
    """The GPTQ column loop. weight: [in, out] in processing order (dead rows zeroed);
    inv_chol: [in, in] upper factor in processing order; order: processing position -> input
    index; static_params: the grid (_grid_parameters, padded to whole parameter units) used
    when static_groups.

    Returns codes and dequantized values [in, out] in processing order and the grid
    parameters. A parameter unit (a group, or a super-block: its group scales share one
    super-scale) gets its grid when its first input is reached, from the rows as updated so
    far; every column is then rounded on that final grid (quantized group scales included), so
    the error pushed onward is the real one. Lazy updates: inside a block of columns a row's current value is
    its value at the block start minus the pending corrections Hinv[block, row]^T @ errors;
    after the block the corrections are applied to all rows at once.
    """
    n_in, n_out = weight.shape
    gs = group_length(spec, n_in)
    unit = _parameter_unit(spec, n_in)
    per_unit = max(unit // gs, 1)
    n_groups = -(-n_in // gs)
    n_units = -(-n_in // unit)
    n_blocks = -(-n_in // block_size)
    padded = n_blocks * block_size
    extra = jnp.arange(n_in, padded)
    w_all = jnp.pad(weight, ((0, padded - n_in), (0, 0)))
    u_all = jnp.pad(inv_chol, ((0, padded - n_in), (0, padded - n_in))).at[extra, extra].set(1.0)
    order_all = jnp.concatenate([order, extra]).astype(jnp.int32)
    position_of = jnp.zeros((n_in,), jnp.int32).at[order].set(jnp.arange(n_in, dtype=jnp.int32))

    codes = jnp.zeros((padded, n_out), _code_dtype(spec))
    values = jnp.zeros((padded, n_out), jnp.float32)
    seen = jnp.full((n_units,), static_groups)

    def unit_params(u, w_start, rows_u, errors):
        # rows past the end repeat the last row: it lies in the last group, so no group's range
        # nor any super-block maximum changes (as quantize's edge padding)
        rows = jnp.minimum(u * unit + jnp.arange(unit), n_in - 1)
        positions = position_of[rows]
        current = w_start[positions] - rows_u[:, positions].T @ errors
        return _unit_parameters(current, spec)

    def set_unit(params, u, new):
        starts = (u * per_unit, u)  # group rows, super-block rows
        return tuple(jax.lax.dynamic_update_slice(p, n.astype(p.dtype), (starts[i // 4], 0))
                     for i, (p, n) in enumerate(zip(params, new)))

    def block_step(b, carry):
        w_start, codes, values, params, seen = carry
        b0 = b * block_size
        rows_u = jax.lax.dynamic_slice(u_all, (b0, 0), (block_size, padded))
        errors = jnp.zeros((block_size, n_out), jnp.float32)

        def column_step(t, inner):
            codes, values, params, seen, errors = inner
            i = b0 + t
            w = w_start[i] - rows_u[:, i] @ errors
            index = order_all[i]
            valid = index < n_in
            g = jnp.minimum(index // gs, n_groups - 1)
            if not static_groups:
                u = g // per_unit
                params = jax.lax.cond(
                    valid & ~seen[u],
                    lambda: set_unit(params, u, unit_params(u, w_start, rows_u, errors)),
                    lambda: params)
                seen = seen.at[u].set(seen[u] | valid)
            c, d = _round_column(w, params[0][g], params[1][g], spec)
            err = jnp.where(valid, (w - d) / rows_u[t, i], 0.0)
            errors = errors.at[t].set(err)
            return codes.at[i].set(c), values.at[i].set(d), params, seen, errors

        codes, values, params, seen, errors = jax.lax.fori_loop(
            0, block_size, column_step, (codes, values, params, seen, errors))
        w_start = w_start - rows_u.T @ errors
        return w_start, codes, values, params, seen

    params = tuple(_pad_rows(p, (n_units * per_unit) if i < 4 else n_units)
                   for i, p in enumerate(static_params))
    carry = (w_all, codes, values, params, seen)
    _, codes, values, params, _ = jax.lax.fori_loop(0, n_blocks, block_step, carry)
    return codes[:n_in], values[:n_in], params


def _pad_rows(p, rows: int):
    return jnp.pad(p, ((0, rows - p.shape[0]), (0, 0)))


def _check_options(block_size: int, act_order: bool, static_groups: bool) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    for name, value in (("act_order", act_order), ("static_groups", static_groups)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def gptq_quantize_weight(weight, hessian, spec: QuantSpec | str, *, block_size: int = 128,
                         damp: float = 0.01, act_order: bool = False,
                         static_groups: bool = False) -> tuple[QArray, dict[str, Any]]:
    """GPTQ one kernel weight: [in, out] given its input Hessian [in, in] (or a PreparedHessian).

    Columns (input features) are quantized in blocks of block_size with lazy updates;
    act_order processes inputs by descending diag(H) and undoes the permutation at the end.
    Groups run along the input axis: with dynamic groups (default) a group's scale and offset
    are computed when its first input is reached in processing order, from the weights as
    updated so far; static_groups computes them all from the original weights up front.
    Returns the QArray (axis 0, the same layout as `quantize(weight, spec)`) and info: the
    relative damping used and the number of dead inputs. With H = I the result equals RTN.
    """
    spec = check_gptq_spec(spec)
    _check_options(block_size, act_order, static_groups)
    w = np.asarray(weight, np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D kernel [in, out], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("weight holds NaN or inf values")
    if isinstance(hessian, PreparedHessian):
        prepared = hessian
    else:
        prepared = prepare_hessian(hessian, damp=damp, act_order=act_order)
    if prepared.size != w.shape[0]:
        raise ValueError(f"hessian is [{prepared.size}, {prepared.size}] but weight has "
                         f"{w.shape[0]} inputs (weight is [in, out])")
    if spec.granularity == "group" and spec.group_size > w.shape[0]:
        raise ValueError(f"group_size {spec.group_size} exceeds the {w.shape[0]} inputs of the "
                         "weight")
    w = w.copy()
    w[prepared.dead] = 0.0
    n_in, n_out = w.shape
    n_groups = -(-n_in // group_length(spec, n_in))
    reference = quantize(jnp.asarray(w), spec, axis=0)  # the grid of static groups
    static_params = _grid_parameters(reference, n_out)
    order = prepared.order
    codes, _, params = _gptq_columns(
        jnp.asarray(w[order]), jnp.asarray(prepared.inverse_cholesky), jnp.asarray(order),
        static_params, spec=spec, block_size=block_size, static_groups=static_groups)
    inverse_order = np.argsort(order)
    codes = codes[jnp.asarray(inverse_order)]
    q = _weight_qarray(codes, params, spec, n_groups)
    info = {"damp": prepared.damp, "dead_inputs": int(prepared.dead.sum())}
    return q, info


def gptq_apply(model, targets, calibration, *, act_order: bool = False,
               static_groups: bool = False, block_size: int = 128, damp: float = 0.01,
               runtime: str = "packed", blocks=None, progress: bool = True
               ) -> dict[str, QuantizedLinear]:
    """GPTQ of every target (lowbit.ptq.targets.Target) of any NNX model, block after block.

    calibration: a list of batches, each what the model's __call__ takes (or what its blocks'
    protocol expects, see lowbit.ptq.driver.ModelBlocks). Each layer's Hessian 2 X^T X / n is
    accumulated in f32 from its input rows (Contraction.rows: im2col patches for a Conv), over
    all batches, from the outputs of the already quantized blocks; layers fed the same input
    share one Hessian. Each layer becomes a packed layer. Returns path -> QuantizedLinear.
    """
    for target in targets:
        check_gptq_spec(target.spec)
    _check_options(block_size, act_order, static_groups)
    check_runtime(runtime)

    def process(context: BlockInputs) -> dict[str, QuantizedLinear]:
        stats = context.statistics((XTX, COUNT))
        prepared: dict[int, tuple] = {}
        out = {}
        for local, target in context.targets.items():
            entry = stats[local]
            key = id(entry)
            if key not in prepared:
                hessian = 2.0 * entry["xtx"] / entry["count"]
                prepared[key] = (hessian, prepare_hessian(hessian, damp=damp,
                                                          act_order=act_order))
            hessian, ready = prepared[key]
            module = module_at(context.block, local)
            matrix = target.contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32))
            q, info = gptq_quantize_weight(matrix, ready, target.spec, block_size=block_size,
                                           static_groups=static_groups)
            report = {**weight_errors(matrix, q.dequantize(), hessian), **info}
            install_packed(context.block, local, q, runtime)
            out[target.path] = QuantizedLinear(weight=q, report=report)
        return out

    linears: dict[str, QuantizedLinear] = {}
    for block_linears in run_blocks(model, targets, calibration, process, blocks=blocks,
                                    progress=progress, desc="gptq"):
        linears.update(block_linears)
    return linears


def gptq_quantize(model, calibration, spec: QuantSpec | str, *, act_order: bool = False,
                  static_groups: bool = False, block_size: int = 128, damp: float = 0.01,
                  batch_size: int = 8, progress: bool = True,
                  runtime: str = "packed") -> PTQResult:
    """GPTQ every block linear of a Llama model in place, block after block.

    calibration: int tokens [samples, seq], run in batches of batch_size sequences. Each
    block's input Hessians (one per shared input: q/k/v, o, gate/up, down) are accumulated in
    f32 over all calibration tokens from the outputs of the already quantized blocks; each
    linear becomes a packed layer (see gptq_apply, which serves any model).
    """
    spec = check_gptq_spec(spec)
    _check_options(block_size, act_order, static_groups)
    start = time.perf_counter()
    targets, batches = llama_block_inputs(model, spec, calibration, batch_size)
    linears = gptq_apply(model, targets, batches, act_order=act_order,
                         static_groups=static_groups, block_size=block_size, damp=damp,
                         runtime=runtime, progress=progress)
    settings = {"weights": str(spec), "act_order": act_order, "static_groups": static_groups,
                "block_size": block_size, "damp": damp,
                "calibration_shape": list(np.shape(calibration))}
    return PTQResult(method="gptq", linears=linears, seconds=time.perf_counter() - start,
                     settings=settings)
