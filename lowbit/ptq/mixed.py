"""Mixed precision: the sensitivity of each block linear (KL against the original model when that
linear alone is quantized with a candidate spec) and an allocator that picks one candidate per
linear to meet a bits-per-weight budget (packed bits, scales included) at the least summed
sensitivity; the candidates' weights come from RTN or from one GPTQ run per candidate.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lowbit.core.packing import PackedArray, pack
from lowbit.core.quantize import quantize
from lowbit.eval.perplexity import ReferenceScorer
from lowbit.files import write_text_atomic
from lowbit.ptq.driver import check_calibration, linear_paths, module_at
from lowbit.ptq.gptq import check_gptq_spec, gptq_quantize
from lowbit.ptq.result import PTQResult, QuantizedLinear, weight_errors
from lowbit.ptq.rtn import parse_weight_spec, rtn_quantize_layer
from lowbit.ptq.targets import install_packed, replace_module

DEFAULT_CANDIDATES = ("int2:g64:asym", "int3:g64:asym", "int4:g64:asym")
BASES = ("rtn", "gptq")  # what quantizes each candidate: RTN per linear, or a GPTQ run per spec
SENSITIVITY_TOKENS = 256  # tokens of the first calibration sequence scored per measurement


def _candidate_specs(candidates: Sequence[str]) -> list[str]:
    if not candidates:
        raise ValueError("candidates must name at least one weight spec")
    specs = [str(parse_weight_spec(c, "candidate")) for c in candidates]
    if len(set(specs)) != len(specs):
        raise ValueError(f"candidates must be distinct, got {list(candidates)}")
    return specs


def _check_base(base: str) -> str:
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    return base


def candidate_weights(model, calibration, candidates: Sequence[str] = DEFAULT_CANDIDATES, *,
                      progress: bool = True, batch_size: int = 8,
                      **gptq_options) -> dict[str, dict[str, PackedArray]]:
    """{spec: {path: packed weight}}: one GPTQ run of the whole model per candidate spec (the
    weights each linear gets when every linear uses that spec), the model restored to float
    after each run (its float linears are put back; no copy of them is made)."""
    specs = _candidate_specs(candidates)
    for spec in specs:
        check_gptq_spec(spec)
    paths = linear_paths(len(model.layers))
    originals = {path: module_at(model, path) for path in paths}
    weights: dict[str, dict[str, PackedArray]] = {}
    for spec in specs:
        try:
            result = gptq_quantize(model, calibration, spec, progress=progress,
                                   batch_size=batch_size, runtime="dequant", **gptq_options)
            weights[spec] = {path: pack(result.linears[path].weight) for path in paths}
        finally:
            for path, module in originals.items():
                replace_module(model, path, module)
    return weights


def layer_sensitivity(model, calibration, candidates: Sequence[str] = DEFAULT_CANDIDATES, *,
                      tokens: int = SENSITIVITY_TOKENS, progress: bool = True,
                      weights: dict[str, dict[str, PackedArray]] | None = None,
                      base: str = "rtn") -> dict[str, Any]:
    """KL(original || model with one linear quantized) for every block linear and candidate.

    calibration: int tokens [samples, seq]; the first `tokens` tokens of the first sequence are
    scored (calibration text: the allocation must not be tuned on the evaluation split). Each
    linear is quantized alone (RTN, or its weight from `weights`, e.g. `candidate_weights`'
    GPTQ runs, with `base` naming where they came from), scored and restored, so the model is
    unchanged afterwards.
    Returns {"candidates": [...], "tokens": n, "layers": {path: {"weights": n,
    "bits": {spec: packed bits}, "kl": {spec: mean KL per token}}}}, the KL over the
    positions that predict a token (lowbit.eval's "all" convention).
    """
    specs = _candidate_specs(candidates)
    _check_base(base)
    if weights is not None and sorted(weights) != sorted(specs):
        raise ValueError(f"weights hold specs {sorted(weights)}, not the candidates {specs}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens must be an integer >= 2, got {tokens!r}")
    window = np.asarray(check_calibration(calibration, model.config)[:1, :tokens])
    reference = ReferenceScorer(model, window[0], ctx=window.shape[1], windows=1,
                                dtype=jnp.float32)
    layers: dict[str, Any] = {}
    paths = linear_paths(len(model.layers))
    for path in tqdm(paths, desc="sensitivity", unit="linear", disable=not progress,
                     leave=False):
        linear = module_at(model, path)
        original = linear.kernel[...]
        kernel = jnp.asarray(original, jnp.float32)
        entry: dict[str, Any] = {"weights": int(kernel.size), "bits": {}, "kl": {}}
        for spec in specs:
            packed = pack(quantize(kernel, spec, axis=0)) if weights is None else \
                weights[spec][path]
            entry["bits"][spec] = int(8 * packed.nbytes)
            linear.kernel.set_value(packed.dequantize().astype(original.dtype))
            entry["kl"][spec] = reference.score(model)["kl"]
        linear.kernel.set_value(original)
        layers[path] = entry
    return {"candidates": specs, "base": base, "tokens": int(window.shape[1]),
            "window_sha256": _fingerprint(window), "layers": layers}


def _fingerprint(window) -> str:
    return hashlib.sha256(np.asarray(window, np.int32).tobytes()).hexdigest()


def _lower_hull(options: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
    """The options (bits, cost, spec) on the lower convex hull of cost against bits, cheapest
    first, each strictly better than the one before: the only choices a greedy allocation by
    cost decrease per extra bit makes optimally."""
    hull: list[tuple[int, float, str]] = []
    for option in sorted(options):
        if hull and option[1] >= hull[-1][1]:
            continue  # more bits and no lower cost: never worth it
        while len(hull) >= 2:
            (b0, c0, _), (b1, c1, _) = hull[-2], hull[-1]
            # drop the middle point if it lies on or above the segment from hull[-2] to option
            if (c1 - c0) * (option[0] - b0) >= (option[1] - c0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def allocate(sensitivity: dict[str, Any], budget: float) -> dict[str, str]:
    """One candidate spec per linear with total bits <= budget x weights and a small summed KL
    (a first-order, additive model of the loss). Start every linear at its cheapest candidate;
    repeatedly take the upgrade with the largest KL decrease per extra bit along each linear's
    lower convex hull while it fits the budget (optimal when the upgrades have equal sizes and
    the costs are convex); then spend what is left on the single switches, to any candidate,
    with the largest KL decrease that still fit.
    """
    layers = sensitivity["layers"]
    if not layers:
        raise ValueError("sensitivity holds no layers")
    total_weights = sum(entry["weights"] for entry in layers.values())
    limit = budget * total_weights
    hulls = {path: _lower_hull([(entry["bits"][s], entry["kl"][s], s) for s in entry["kl"]])
             for path, entry in layers.items()}
    level = {path: 0 for path in layers}
    used = sum(hull[0][0] for hull in hulls.values())
    if used > limit:
        cheapest = used / total_weights
        raise ValueError(f"budget {budget} bits per weight is below the cheapest allocation "
                         f"({cheapest:.4f})")
    heap: list[tuple[float, str]] = []

    def push(path):
        hull, i = hulls[path], level[path]
        if i + 1 < len(hull):
            gain = (hull[i][1] - hull[i + 1][1]) / (hull[i + 1][0] - hull[i][0])
            heapq.heappush(heap, (-gain, path))

    for path in layers:
        push(path)
    while heap:
        _, path = heapq.heappop(heap)
        hull, i = hulls[path], level[path]
        extra = hull[i + 1][0] - hull[i][0]
        if used + extra > limit:
            continue  # this linear stays; smaller upgrades elsewhere may still fit
        used += extra
        level[path] = i + 1
        push(path)
    choice = {path: hulls[path][level[path]] for path in layers}
    while True:  # the hull skips options that may be the only ones left that fit
        best = None
        for path, entry in layers.items():
            bits, cost, _ = choice[path]
            for spec, kl in entry["kl"].items():
                extra = entry["bits"][spec] - bits
                if kl < cost and extra > 0 and used + extra <= limit and \
                        (best is None or cost - kl > best[0]):
                    best = (cost - kl, path, (entry["bits"][spec], kl, spec), extra)
        if best is None:
            break
        _, path, option, extra = best
        choice[path] = option
        used += extra
    return {path: option[2] for path, option in choice.items()}


def predicted_kl(sensitivity: dict[str, Any], allocation: dict[str, str]) -> float:
    """The summed per-layer KL of an allocation (the allocator's objective)."""
    return float(sum(sensitivity["layers"][p]["kl"][s] for p, s in allocation.items()))


def uniform_allocation(sensitivity: dict[str, Any], spec: str) -> dict[str, str]:
    """Every linear at one candidate spec (the baseline an allocation is compared with)."""
    spec = str(parse_weight_spec(spec))
    if spec not in sensitivity["candidates"]:
        raise ValueError(f"spec {spec!r} is not one of the measured candidates "
                         f"{sensitivity['candidates']}")
    return {path: spec for path in sensitivity["layers"]}


def apply_allocation(model, allocation: dict[str, str], *, runtime: str = "packed",
                     weights: dict[str, dict[str, PackedArray]] | None = None,
                     **settings) -> PTQResult:
    """A spec per linear (path -> spec string), in place (packed layers): RTN, or the linear's
    weight for that spec from `weights` (see candidate_weights)."""
    start = time.perf_counter()
    linears: dict[str, QuantizedLinear] = {}
    for path in linear_paths(len(model.layers)):
        if path not in allocation:
            raise ValueError(f"allocation has no spec for {path!r}")
        spec = str(parse_weight_spec(allocation[path]))
        if weights is None:
            linears[path] = rtn_quantize_layer(model, path, parse_weight_spec(spec),
                                               runtime=runtime)
            continue
        if spec not in weights:
            raise ValueError(f"allocation gives {path!r} spec {spec!r}, which weights lack "
                             f"(they hold {sorted(weights)})")
        q = weights[spec][path].unpack()
        kernel = jnp.asarray(module_at(model, path).kernel[...], jnp.float32)
        report = weight_errors(kernel, q.dequantize())
        install_packed(model, path, q, runtime)
        linears[path] = QuantizedLinear(weight=q, report=report)
    counts: dict[str, int] = {}
    for spec in allocation.values():
        counts[spec] = counts.get(spec, 0) + 1
    return PTQResult(method="mixed", linears=linears, seconds=time.perf_counter() - start,
                     settings={**settings, "spec_counts": counts, "allocation": allocation})


def save_sensitivity(sensitivity: dict[str, Any], path: str | Path) -> Path:
    """Writes a sensitivity table as JSON (temporary file, then rename)."""
    return write_text_atomic(path, json.dumps(sensitivity, indent=1))


def mixed_quantize(model, calibration, budget: float,
                   candidates: Sequence[str] = DEFAULT_CANDIDATES, *,
                   sensitivity_file: str | Path | None = None, base: str = "rtn",
                   batch_size: int = 8, progress: bool = True,
                   runtime: str = "packed") -> PTQResult:
    """Mixed precision of every block linear at `budget` bits per weight (packed bits of codes,
    scales and offsets, exactly: super-block scales count their 6-bit codes), in place.

    base: "rtn" quantizes each candidate per linear; "gptq" runs GPTQ once per candidate on
    the calibration tokens (batches of batch_size; each run sees the outputs of blocks
    quantized with its own spec, an approximation for the mixed model) and both the
    sensitivities and the installed weights are those GPTQ weights.
    The sensitivity table is measured on the calibration tokens, or read from
    `sensitivity_file` when it exists and holds the same candidates and base (written there
    otherwise). The result's seconds include the sensitivity measurement when it ran.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or \
            not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bits per weight, got {budget!r}")
    specs = _candidate_specs(candidates)
    _check_base(base)
    start = time.perf_counter()
    weights = None
    if base == "gptq":
        weights = candidate_weights(model, check_calibration(calibration, model.config), specs,
                                    progress=progress, batch_size=batch_size)
    sensitivity = None
    if sensitivity_file is not None and Path(sensitivity_file).exists():
        sensitivity = json.loads(Path(sensitivity_file).read_text())
        if sensitivity.get("candidates") != specs:
            raise ValueError(f"{str(sensitivity_file)!r} holds candidates "
                             f"{sensitivity.get('candidates')}, not {specs}")
        if sensitivity.get("base", "rtn") != base:
            raise ValueError(f"{str(sensitivity_file)!r} was measured with base "
                             f"{sensitivity.get('base', 'rtn')!r}, not {base!r}")
        if list(sensitivity.get("layers", {})) != linear_paths(len(model.layers)):
            raise ValueError(f"{str(sensitivity_file)!r} was measured on a model with other "
                             "layers")
        window = check_calibration(calibration, model.config)[:1, :sensitivity["tokens"]]
        if sensitivity.get("window_sha256") != _fingerprint(window):
            raise ValueError(f"{str(sensitivity_file)!r} was measured on other calibration "
                             "tokens; remove it to measure again")
    if sensitivity is None:
        sensitivity = layer_sensitivity(model, calibration, specs, progress=progress,
                                        weights=weights, base=base)
        if sensitivity_file is not None:
            save_sensitivity(sensitivity, sensitivity_file)
    allocation = allocate(sensitivity, budget)
    result = apply_allocation(model, allocation, runtime=runtime, weights=weights, budget=budget,
                              base=base, candidates=specs,
                              predicted_kl=predicted_kl(sensitivity, allocation))
    result.seconds = time.perf_counter() - start
    return result
