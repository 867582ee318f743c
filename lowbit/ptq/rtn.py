"""Round-to-nearest (RTN): every block linear quantized on its own with any weight spec, no data.

The model keeps dequantized float kernels (fake-quant); the QArrays go into the result.
"""

from __future__ import annotations

import time

import jax.numpy as jnp

from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec
from lowbit.ptq.driver import LINEAR_NAMES, module_at
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors


def parse_weight_spec(spec: QuantSpec | str, argument: str = "weights") -> QuantSpec:
    """A QuantSpec from a spec or its string form; `token` granularity is not a weight spec."""
    if isinstance(spec, str):
        spec = QuantSpec.parse(spec)
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"{argument} must be a QuantSpec or a spec string, got "
                         f"{type(spec).__name__}")
    if spec.granularity == "token":
        raise ValueError(f"{argument} spec {str(spec)!r} uses token granularity, which is for "
                         "activations; use tensor, channel or gN for weights")
    return spec


def rtn_quantize_block(block, spec: QuantSpec, prefix: str = "") -> dict[str, QuantizedLinear]:
    """Quantizes the seven linears of one block in place; returns path -> QuantizedLinear."""
    out = {}
    for name in LINEAR_NAMES:
        linear = module_at(block, name)
        kernel = jnp.asarray(linear.kernel[...], jnp.float32)
        q = quantize(kernel, spec, axis=0)
        dequantized = q.dequantize()
        linear.kernel.set_value(dequantized.astype(linear.kernel[...].dtype))
        out[prefix + name] = QuantizedLinear(weight=q, report=weight_errors(kernel, dequantized))
    return out


def rtn_quantize(model, spec: QuantSpec | str) -> PTQResult:
    """Round-to-nearest quantization of every block linear of a Llama model, in place.

    spec: any weight spec (kind, bits, granularity along the input axis, asym...). The
    embedding, norms and tied head stay as they are.
    """
    spec = parse_weight_spec(spec)
    start = time.perf_counter()
    linears: dict[str, QuantizedLinear] = {}
    for index, block in enumerate(model.layers):
        linears.update(rtn_quantize_block(block, spec, prefix=f"layers.{index}."))
    return PTQResult(method="rtn", linears=linears, seconds=time.perf_counter() - start,
                     settings={"weights": str(spec)})
