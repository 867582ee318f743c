"""SmoothQuant (arXiv 2211.10438): migrate activation outliers into the weights with per-channel
scales folded into the RMSNorms, then run every block linear as W8A8 (int8 x int8 -> int32).
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp

from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec
from lowbit.ptq.driver import (ABS_MAX, INPUT_GROUPS, LINEAR_NAMES, BlockCalibration,
                               check_batch_size, check_calibration, merge_blocks, module_at,
                               replace_module, run_sequential)
from lowbit.ptq.layers import INT8_MAX, W8A8Linear, parse_activation_spec
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors
from lowbit.ptq.rtn import parse_weight_spec

# Inputs that are smoothed, and the op each one's 1/s is folded into: the RMSNorms (the reference
# recipe for Llama). The o input has no such op under GQA; the down input can be smoothed through
# up's output columns (silu(gate) * up is linear in up), which this module offers as an option.
SMOOTHED: dict[str, str] = {"attn_in": "attn_norm", "mlp_in": "ffn_norm"}
SMOOTHED_DOWN: dict[str, str] = {"mlp_hidden": "mlp.w_up"}
_MIN = 1e-5


def check_w8a8_weight_spec(spec: QuantSpec | str) -> QuantSpec:
    """The spec if it is symmetric int8 with tensor or channel (per output column) scales."""
    spec = parse_weight_spec(spec)
    if spec.kind != "int" or spec.bits != 8 or not spec.symmetric \
            or spec.granularity not in ("tensor", "channel"):
        raise ValueError(f"W8A8 weights must be symmetric int8 per tensor or per channel "
                         f"('int8' or 'int8:channel'), got {str(spec)!r}")
    return spec


def check_alpha(alpha: float | None) -> float | None:
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (or None for no smoothing), "
                         f"got {alpha!r}")
    return float(alpha)


def smooth_scales(act_absmax, weights, alpha: float) -> jnp.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j (at least 1e-5).

    act_absmax: [in] calibration max |x| per channel; weights: kernels [in, out] sharing the
    input (the max runs over all of them).
    """
    alpha = check_alpha(alpha)
    if alpha is None:
        raise ValueError("alpha must be a number in [0, 1] to compute smoothing scales")
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=1)
                               for w in weights]), axis=0)
    a = jnp.maximum(jnp.asarray(act_absmax, jnp.float32), _MIN)
    s = a ** alpha / jnp.maximum(w_max, _MIN) ** (1.0 - alpha)
    return jnp.maximum(s, _MIN)


def smooth_block(block, act_absmax: dict[str, Any], alpha: float, *,
                 smooth_down: bool = False) -> dict[str, jnp.ndarray]:
    """Folds the smoothing scales into one block in place (no quantization), so the block
    computes the same function: the RMSNorm weight (or, for the down input with smooth_down,
    the columns of w_up) is divided by s and the rows of the linears reading it multiplied by s.

    act_absmax: max |x| per channel, {"attn_in": [d], "mlp_in": [d]} (+ "mlp_hidden": [ffn]).
    Returns the scales per smoothed input.
    """
    targets = {**SMOOTHED, **(SMOOTHED_DOWN if smooth_down else {})}
    scales = {}
    for group, previous_name in targets.items():
        if group not in act_absmax:
            raise ValueError(f"act_absmax needs an entry for {group!r}")
        linears = [module_at(block, name) for name in INPUT_GROUPS[group]]
        s = smooth_scales(act_absmax[group], [lin.kernel[...] for lin in linears], alpha)
        previous = module_at(block, previous_name)
        if hasattr(previous, "kernel"):
            kernel = previous.kernel[...]
            previous.kernel.set_value((kernel / s[None, :]).astype(kernel.dtype))
        else:
            previous.weight.set_value((previous.weight[...] / s).astype(previous.weight[...].dtype))
        for lin in linears:
            lin.kernel.set_value((lin.kernel[...] * s[:, None]).astype(lin.kernel[...].dtype))
        scales[group] = s
    return scales


def smoothquant_quantize(model, calibration, weights: QuantSpec | str = "int8:channel",
                         act: str = "int8:tensor:static", *, alpha: float | None = 0.85,
                         smooth_down: bool = False, batch_size: int = 8,
                         progress: bool = True) -> PTQResult:
    """SmoothQuant W8A8 of every block linear of a Llama model, in place.

    Per block: max |x| per input channel of each linear input over the calibration tokens
    (which come from the already quantized blocks); q/k/v and gate/up inputs are smoothed with
    `alpha` (None: no smoothing, the naive W8A8 baseline); weights become int8 (weights spec:
    'int8' per tensor or 'int8:channel'); activations follow `act` ('int8:token' O1,
    'int8:tensor' O2, 'int8:tensor:static' O3 with the calibrated max of each smoothed input).
    smooth_down also smooths the down projection's input through w_up's output columns (not
    in the reference recipe). The linears are replaced by W8A8Linear modules.
    """
    spec = check_w8a8_weight_spec(weights)
    act_mode = parse_activation_spec(act)
    alpha = check_alpha(alpha)
    check_batch_size(batch_size)
    tokens = check_calibration(calibration, model.config)
    start = time.perf_counter()

    def process(context: BlockCalibration):
        block = context.block
        stats = context.statistics({g: (ABS_MAX,) for g in INPUT_GROUPS})
        absmax = {g: stats[g]["abs_max"] for g in INPUT_GROUPS}
        original = {n: jnp.asarray(module_at(block, n).kernel[...], jnp.float32)
                    for n in LINEAR_NAMES}
        scales = (smooth_block(block, absmax, alpha, smooth_down=smooth_down)
                  if alpha is not None else {})
        report: dict[str, Any] = {"block": context.index}
        for group, s in scales.items():
            report[group] = {"scale_min": float(s.min()), "scale_max": float(s.max()),
                             "act_max_before": float(absmax[group].max()),
                             "act_max_after": float((absmax[group] / s).max())}
        out = {}
        for group, names in INPUT_GROUPS.items():
            s = scales.get(group)
            input_max = float((absmax[group] if s is None else absmax[group] / s).max())
            act_scale = max(input_max, 1e-8) / INT8_MAX
            for name in names:
                kernel = jnp.asarray(module_at(block, name).kernel[...], jnp.float32)
                q = quantize(kernel, spec, axis=0)
                layer = W8A8Linear.from_qarray(q, act_mode,
                                               act_scale if act_mode == "static" else None)
                replace_module(block, name, layer)
                effective = q.dequantize()  # in the original (unsmoothed) coordinates:
                if s is not None:
                    effective = effective / s[:, None]
                for down_group, previous in SMOOTHED_DOWN.items():
                    if name == previous and down_group in scales:
                        effective = effective * scales[down_group][None, :]
                options = {"act": act_mode}
                if act_mode == "static":
                    options["act_scale"] = act_scale
                out[f"layers.{context.index}.{name}"] = QuantizedLinear(
                    weight=q, runtime="w8a8", options=options,
                    report=weight_errors(original[name], effective))
        return out, report

    linears, block_reports = merge_blocks(run_sequential(model, tokens, process,
                                                         batch_size=batch_size,
                                                         progress=progress, desc="smoothquant"))
    settings = {"weights": str(spec), "act": act, "act_mode": act_mode, "alpha": alpha,
                "smooth_down": smooth_down,
                "calibration_shape": list(tokens.shape)}
    return PTQResult(method="smoothquant", linears=linears, seconds=time.perf_counter() - start,
                     settings=settings, block_reports=block_reports)


# ---- SmoothQuant on any NNX model: the model-agnostic driver and scale groups ---------------


def smoothquant_apply(model, targets, calibration, *, act: str = "int8:tensor:static",
                      alpha: float | None = 0.85, scale_groups=None, blocks=None,
                      progress: bool = True, quantize_weights: bool = True
                      ) -> tuple[dict[str, QuantizedLinear], list[dict]]:
    """SmoothQuant W8A8 of every target (lowbit.ptq.targets.Target; each spec symmetric int8
    per tensor or channel) of any NNX model, block after block, in place.

    Per block: max |x| per input feature of each layer's rows over all calibration batches;
    targets are grouped by shared input (lowbit.ptq.scaling, as in AWQ); each group gets
    s = max|X|^alpha / max|W|^(1 - alpha) (alpha None: no smoothing), folded into the group's
    declared norm or layer (checked to keep the block's function) or else kept as the W8A8
    layers' input scale; each target becomes a W8A8Linear over its contraction (activations as
    `act`; static: max of the smoothed input / 127). quantize_weights=False stops after the
    folds (the smoothed float model, for checking the equivalence). Returns (path ->
    QuantizedLinear, block reports).
    """
    from lowbit.ptq.driver import BlockInputs, run_blocks
    from lowbit.ptq.scaling import apply_folds, declared_groups, resolve_groups

    for target in targets:
        check_w8a8_weight_spec(target.spec)
    act_mode = parse_activation_spec(act)
    alpha = check_alpha(alpha)
    declared = declared_groups(model, scale_groups)

    def process(context: BlockInputs):
        stats = context.statistics((ABS_MAX,))
        groups = resolve_groups(context, declared, stats)
        matrices = {local: t.contraction.matrix(jnp.asarray(
            module_at(context.block, local).kernel[...], jnp.float32))
            for local, t in context.targets.items()}
        scales = {}
        report: dict[str, Any] = {"block": context.index, "groups": []}
        for index, group in enumerate(groups):
            absmax = stats[group.members[0]]["abs_max"]
            if alpha is not None:
                s = smooth_scales(absmax, [matrices[m] for m in group.members], alpha)
                scales[index] = s
                report["groups"].append({"members": list(group.members), "fold": group.fold,
                                         "scale_min": float(s.min()),
                                         "scale_max": float(s.max()),
                                         "act_max_before": float(absmax.max()),
                                         "act_max_after": float((absmax / s).max())})
        out_scaled = apply_folds(context, groups, scales)
        for entry, group in zip(report["groups"], groups):
            entry["fold"] = group.fold  # a derived fold that changed the function was dropped
        if not quantize_weights:
            return {}, report
        out = {}
        for index, group in enumerate(groups):
            s = scales.get(index)
            absmax = stats[group.members[0]]["abs_max"]
            input_max = float((absmax if s is None else absmax / s).max())
            act_scale = max(input_max, 1e-8) / INT8_MAX if act_mode == "static" else None
            for local in group.members:
                target = context.targets[local]
                module = module_at(context.block, local)
                current = target.contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32))
                unfolded = s is not None and group.fold is None
                q = quantize(current * s[:, None] if unfolded else current, target.spec, axis=0)
                layer = W8A8Linear.from_module(module, q, act_mode, act_scale, path=target.path,
                                               input_scale=1.0 / s if unfolded else None)
                replace_module(context.block, local, layer)
                effective = q.dequantize() if s is None else q.dequantize() / s[:, None]
                if local in out_scaled:
                    effective = effective * out_scaled[local][None, :]
                options = {"act": act_mode, **({"act_scale": act_scale} if act_scale else {})}
                out[target.path] = QuantizedLinear(weight=q, runtime="w8a8", options=options,
                                                   report=weight_errors(matrices[local],
                                                                        effective))
        return out, report

    results = run_blocks(model, targets, calibration, process, blocks=blocks, progress=progress,
                         desc="smoothquant")
    return merge_blocks(results)
