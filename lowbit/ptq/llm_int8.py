"""LLM.int8() (arXiv 2208.07339): vector-wise int8 weights and activations, with the input
features that hold outliers (|x| >= threshold, 6.0 in the paper) multiplied in float.
"""

from __future__ import annotations

import time

import jax.numpy as jnp

from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec
from lowbit.ptq.driver import LINEAR_NAMES, module_at, replace_module
from lowbit.ptq.layers import LLMInt8Linear, check_threshold
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors
from lowbit.ptq.smoothquant import check_w8a8_weight_spec

DEFAULT_THRESHOLD = 6.0


def llm_int8_quantize(model, weights: QuantSpec | str = "int8:channel",
                      threshold: float | None = DEFAULT_THRESHOLD, *,
                      max_outliers: int | None = None) -> PTQResult:
    """Replaces every block linear of a Llama model with an LLMInt8Linear, in place; no data.

    weights: 'int8:channel' (vector-wise: one scale per output column, the paper's method) or
    'int8' (one scale per tensor); threshold None drops the outlier path (plain int8);
    max_outliers: at most this many input features per call take the float path (default
    ceil(K / 8) per layer; see LLMInt8Linear).
    """
    spec = check_w8a8_weight_spec(weights)
    threshold = check_threshold(threshold)
    start = time.perf_counter()
    linears = {}
    for index, block in enumerate(model.layers):
        for name in LINEAR_NAMES:
            kernel = jnp.asarray(module_at(block, name).kernel[...], jnp.float32)
            q = quantize(kernel, spec, axis=0)
            replace_module(block, name, LLMInt8Linear.from_qarray(q, threshold,
                                                                  max_outliers=max_outliers))
            linears[f"layers.{index}.{name}"] = QuantizedLinear(
                weight=q, runtime="llm_int8", options={"threshold": threshold},
                report=weight_errors(kernel, q.dequantize()))
    return PTQResult(method="llm_int8", linears=linears, seconds=time.perf_counter() - start,
                     settings={"weights": str(spec), "threshold": threshold,
                               "max_outliers": max_outliers})



def llm_int8_apply(model, targets, threshold: float | None = DEFAULT_THRESHOLD, *,
                   max_outliers: int | None = None) -> dict[str, QuantizedLinear]:
    """LLM.int8() of every target (lowbit.ptq.targets.Target; each spec symmetric int8 per
    tensor or channel) of any NNX model, in place, no data: each becomes an LLMInt8Linear over
    its contraction (outlier features of its rows in float, the rest int8). Returns path ->
    QuantizedLinear."""
    for target in targets:
        check_w8a8_weight_spec(target.spec)
    threshold = check_threshold(threshold)
    linears = {}
    for target in targets:
        module = module_at(model, target.path)
        matrix = target.contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32))
        q = quantize(matrix, target.spec, axis=0)
        replace_module(model, target.path, LLMInt8Linear.from_module(
            module, q, threshold, max_outliers=max_outliers, path=target.path))
        linears[target.path] = QuantizedLinear(
            weight=q, runtime="llm_int8", options={"threshold": threshold},
            report=weight_errors(matrix, q.dequantize()))
    return linears
