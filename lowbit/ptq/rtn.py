"""Round-to-nearest (RTN): every block linear quantized on its own with any weight spec, no data
(optionally with per-group clip ratios picked by a clipping observer from the weight itself).
The model keeps dequantized float kernels (fake-quant); the QArrays go into the result.
"""

from __future__ import annotations

import time

import jax.numpy as jnp

from lowbit.core.calibrate import OBSERVERS, clip_ratios
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


def check_weight_observer(observer: str | None, spec: QuantSpec) -> str | None:
    """None (plain min-max ranges) or a clipping observer that can serve `spec`."""
    if observer is None:
        return None
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be None or one of {OBSERVERS}, got {observer!r}")
    if spec.kind in ("binary", "ternary"):
        raise ValueError(f"observer {observer!r} needs a range-based spec (int, nf4, fp4, fp8); "
                         f"{str(spec)!r} has mean-based scales")
    if spec.clip is not None:
        raise ValueError(f"spec {str(spec)!r} fixes a clip ratio; drop clipR to use observer "
                         f"{observer!r}")
    return observer


def rtn_quantize_linear(linear, spec: QuantSpec,
                        observer: str | None = None) -> QuantizedLinear:
    """Quantizes one linear's kernel [in, out] in place (the kernel keeps the dequantized
    values); observer: None (min-max) or a `lowbit.core.calibrate` observer choosing per-group
    clip ratios (their mean and minimum go into the report)."""
    kernel = jnp.asarray(linear.kernel[...], jnp.float32)
    ratio = None if observer is None else clip_ratios(kernel, spec, observer, axis=0)
    q = quantize(kernel, spec, axis=0, clip_ratio=ratio)
    dequantized = q.dequantize()
    linear.kernel.set_value(dequantized.astype(linear.kernel[...].dtype))
    report = weight_errors(kernel, dequantized)
    if ratio is not None:
        report.update(clip_ratio_mean=float(ratio.mean()), clip_ratio_min=float(ratio.min()))
    return QuantizedLinear(weight=q, report=report)


def rtn_quantize_block(block, spec: QuantSpec, prefix: str = "",
                       observer: str | None = None) -> dict[str, QuantizedLinear]:
    """Quantizes the seven linears of one block in place; returns path -> QuantizedLinear."""
    return {prefix + name: rtn_quantize_linear(module_at(block, name), spec, observer)
            for name in LINEAR_NAMES}


def rtn_quantize(model, spec: QuantSpec | str, observer: str | None = None) -> PTQResult:
    """Round-to-nearest quantization of every block linear of a Llama model, in place.

    spec: any weight spec (kind, bits, granularity along the input axis, asym...). The
    embedding, norms and tied head stay as they are.
    observer: None keeps each group's full min-max range; one of
    `lowbit.core.calibrate.OBSERVERS` picks a clip ratio per group from the weight itself
    ("mse": the ratio minimizing the group's reconstruction MSE on the spec's grid).
    """
    spec = parse_weight_spec(spec)
    observer = check_weight_observer(observer, spec)
    start = time.perf_counter()
    linears: dict[str, QuantizedLinear] = {}
    for index, block in enumerate(model.layers):
        linears.update(rtn_quantize_block(block, spec, prefix=f"layers.{index}.",
                                          observer=observer))
    return PTQResult(method="rtn", linears=linears, seconds=time.perf_counter() - start,
                     settings={"weights": str(spec), "observer": observer})
