"""Static activation quantization: a clipping observer picks each block linear input's symmetric
int threshold from calibration data, and the linears fake-quantize their inputs with it.
"""

from __future__ import annotations

import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowbit.core.calibrate import (OBSERVERS, check_bits, check_observer, check_percentile,
                                   clip_threshold)
from lowbit.ptq.driver import (ABS_MAX, INPUT_GROUPS, BlockCalibration, check_batch_size,
                               check_calibration, coprime_stride, module_at, replace_module,
                               run_sequential, strided_sample)
from lowbit.ptq.layers import ActQuantLinear
from lowbit.ptq.result import PTQResult, QuantizedLinear

ACT_GRANULARITIES = ("tensor", "channel")


def check_act_granularity(granularity: str) -> str:
    if granularity not in ACT_GRANULARITIES:
        raise ValueError(f"granularity must be one of {ACT_GRANULARITIES} (static thresholds: "
                         f"one per input, or one per input feature), got {granularity!r}")
    return granularity


def _check_options(act_bits, observer, granularity, percentile, sample_tokens):
    """The checked (act_bits, granularity, percentile); ValueError naming a bad option."""
    check_observer(observer)
    if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 1:
        raise ValueError(f"sample_tokens must be a positive integer, got {sample_tokens!r}")
    return check_bits(act_bits), check_act_granularity(granularity), check_percentile(percentile)


def act_quantize(model, calibration, act_bits: int, observer: str, *,
                 granularity: str = "tensor", sample_tokens: int = 2048, percentile: float = 99.99,
                 batch_size: int = 8, progress: bool = True) -> PTQResult:
    """Quantizes the input of every block linear of a Llama model to symmetric int `act_bits`
    with a static clip threshold picked by `observer` (one of OBSERVERS), in place.

    calibration: int tokens [samples, seq]. Blocks are calibrated in order (each sees the
    hidden states of the already quantized blocks before it); per input group (attn_in,
    attn_out, mlp_in, mlp_hidden) the observer sees a strided sample of about `sample_tokens`
    tokens and gives one threshold (granularity "tensor") or one per input feature
    ("channel"). Each linear is wrapped in an ActQuantLinear (values beyond the threshold
    saturate; the matmul stays in float), so weights are untouched: run rtn_quantize (or any
    weight method that keeps float kernels) first to combine both. The result has no quantized
    weights (`linears` is empty); thresholds per group are in block_reports.
    """
    act_bits, granularity, percentile = _check_options(act_bits, observer, granularity, percentile,
                                                       sample_tokens)
    check_batch_size(batch_size)
    tokens = check_calibration(calibration, model.config)
    stride = coprime_stride(tokens.size, sample_tokens, tokens.shape[1])
    sample = strided_sample(stride)
    axis = None if granularity == "tensor" else 1
    start = time.perf_counter()

    def process(context: BlockCalibration) -> dict[str, Any]:
        stats = context.statistics({g: (sample, ABS_MAX) for g in INPUT_GROUPS})
        report: dict[str, Any] = {"block": context.index}
        for group, names in INPUT_GROUPS.items():
            values = np.asarray(stats[group][sample.name], np.float32)  # [sampled, features]
            threshold = clip_threshold(values, act_bits, observer, axis=axis,
                                       percentile=percentile)
            absmax = np.asarray(stats[group]["abs_max"], np.float32)
            clipped = float(np.mean(np.abs(values) > (threshold if axis is None
                                                      else threshold[None, :])))
            report[group] = {"threshold": threshold, "absmax": float(absmax.max()),
                             "sampled_tokens": int(values.shape[0]),
                             "clipped_fraction": clipped}
            for name in names:
                replace_module(context.block, name,
                               ActQuantLinear(module_at(context.block, name), threshold,
                                              act_bits))
        return report

    block_reports = run_sequential(model, tokens, process, batch_size=batch_size,
                                   progress=progress, desc=f"act{act_bits} {observer}")
    settings = {"act_bits": act_bits, "observer": observer, "granularity": granularity,
                "sample_tokens": sample_tokens, "stride": stride,
                "calibration_shape": list(tokens.shape)}
    if observer == "percentile":
        settings["percentile"] = percentile
    return PTQResult(method="act", linears={}, seconds=time.perf_counter() - start,
                     settings=settings, block_reports=block_reports)


__all__ = ["ACT_GRANULARITIES", "OBSERVERS", "act_quantize", "check_act_granularity"]


def act_apply(model, targets, calibration, act_bits: int, observer: str, *,
              granularity: str = "tensor", sample_tokens: int = 2048, percentile: float = 99.99,
              runtime: str = "packed", blocks=None, progress: bool = True
              ) -> tuple[dict[str, QuantizedLinear], list[dict]]:
    """Static activation quantization of every target of any NNX model, block after block, in
    place: each target's weights are RTN-quantized with its rule's spec into a packed layer,
    and its input rows (Contraction.rows) are fake-quantized to symmetric int `act_bits` with
    a static threshold that `observer` picks from a strided sample of about `sample_tokens`
    rows of the calibration batches (one threshold per layer for granularity "tensor", one
    per contracted feature for "channel"), as ActQuantLayers. Returns (path ->
    QuantizedLinear, block reports with the thresholds)."""
    from lowbit.nn.packed_layer import packed_layer
    from lowbit.ptq.driver import BATCH_COUNTS, BlockInputs, merge_blocks, rows_stride, run_blocks
    from lowbit.ptq.layers import ActQuantLayer
    from lowbit.ptq.rtn import rtn_quantize_matrix
    from lowbit.ptq.targets import check_runtime

    act_bits, granularity, percentile = _check_options(act_bits, observer, granularity, percentile,
                                                       sample_tokens)
    check_runtime(runtime)
    axis = None if granularity == "tensor" else 1

    def process(context: BlockInputs):
        counts = context.statistics((BATCH_COUNTS, ABS_MAX))
        per = {}
        for local in context.targets:
            rows = np.asarray(counts[local]["batch_counts"])
            per[local] = (strided_sample(rows_stride(int(rows.sum()), sample_tokens, rows)),)
        samples = context.statistics(per)
        report: dict[str, Any] = {"block": context.index}
        out = {}
        for local, target in context.targets.items():
            values = np.asarray(samples[local][per[local][0].name], np.float32)
            threshold = clip_threshold(values, act_bits, observer, axis=axis,
                                       percentile=percentile)
            module = module_at(context.block, local)
            q, errors = rtn_quantize_matrix(
                target.contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32)),
                target.spec)
            layer = ActQuantLayer(packed_layer(module, q, runtime=runtime), threshold, act_bits)
            replace_module(context.block, local, layer)
            clipped = float(np.mean(np.abs(values) > (threshold if axis is None
                                                      else threshold[None, :])))
            report[target.path] = {"threshold": threshold, "sampled_rows": int(values.shape[0]),
                                   "clipped_fraction": clipped}
            out[target.path] = QuantizedLinear(weight=q, options={"act_bits": act_bits},
                                               report={**errors, "clipped_fraction": clipped})
        return out, report

    return merge_blocks(run_blocks(model, targets, calibration, process, blocks=blocks,
                                   progress=progress, desc=f"act{act_bits} {observer}"))
