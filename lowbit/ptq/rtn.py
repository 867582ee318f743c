"""Round-to-nearest (RTN): every block linear quantized on its own with any weight spec, no data
(optionally with per-group clip ratios picked by a clipping observer from the weight itself).
Each quantized layer becomes a packed layer; the QArrays also go into the result.
"""

from __future__ import annotations

import time

import jax.numpy as jnp

from lowbit.core.calibrate import OBSERVERS, clip_ratios
from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec
from lowbit.nn.contraction import contraction_of
from lowbit.ptq.driver import linear_paths
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors
from lowbit.ptq.targets import check_runtime, install_packed, module_at


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


def rtn_quantize_layer(model, path: str, spec: QuantSpec, observer: str | None = None,
                       runtime: str = "packed") -> QuantizedLinear:
    """Quantizes the kernel of the layer at `path` (any layer lowbit.nn.contraction_of serves,
    as its [K, N] matrix, groups along K) and puts a packed layer holding the codes in its
    place. observer: None (min-max) or a `lowbit.core.calibrate` observer choosing per-group
    clip ratios (their mean and minimum go into the report)."""
    module = module_at(model, path)
    contraction = contraction_of(module, path)
    matrix = contraction.matrix(jnp.asarray(module.kernel[...], jnp.float32))
    q, report = rtn_quantize_matrix(matrix, spec, observer)
    install_packed(model, path, q, runtime)
    return QuantizedLinear(weight=q, report=report)


def rtn_quantize_matrix(matrix, spec: QuantSpec, observer: str | None = None):
    """(QArray, report) of a [K, N] matrix quantized along K, with the observer's per-group clip
    ratios when given (their mean and minimum go into the report)."""
    ratio = None if observer is None else clip_ratios(matrix, spec, observer, axis=0)
    q = quantize(matrix, spec, axis=0, clip_ratio=ratio)
    report = weight_errors(matrix, q.dequantize())
    if ratio is not None:
        report.update(clip_ratio_mean=float(ratio.mean()), clip_ratio_min=float(ratio.min()))
    return q, report


def rtn_apply(model, targets, *, observer: str | None = None,
              runtime: str = "packed") -> dict[str, QuantizedLinear]:
    """RTN of every target (lowbit.ptq.targets.Target) of any model, in place: path ->
    QuantizedLinear. No data."""
    for target in targets:
        check_weight_observer(observer, target.spec)
    return {t.path: rtn_quantize_layer(model, t.path, t.spec, observer, runtime) for t in targets}


def rtn_quantize(model, spec: QuantSpec | str, observer: str | None = None, *,
                 runtime: str = "packed") -> PTQResult:
    """Round-to-nearest quantization of every block linear of a Llama model, in place: each
    becomes a packed layer (runtime "packed", or "dequant" for fake-quant float execution).

    spec: any weight spec (kind, bits, granularity along the input axis, asym...). The
    embedding, norms and tied head stay as they are.
    observer: None keeps each group's full min-max range; one of
    `lowbit.core.calibrate.OBSERVERS` picks a clip ratio per group from the weight itself
    ("mse": the ratio minimizing the group's reconstruction MSE on the spec's grid).
    """
    spec = parse_weight_spec(spec)
    observer = check_weight_observer(observer, spec)
    check_runtime(runtime)
    start = time.perf_counter()
    linears = {path: rtn_quantize_layer(model, path, spec, observer, runtime)
               for path in linear_paths(len(model.layers))}
    return PTQResult(method="rtn", linears=linears, seconds=time.perf_counter() - start,
                     settings={"weights": str(spec), "observer": observer})
