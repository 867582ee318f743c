"""The one registry of PTQ methods (name -> function, options, defaults) used by the CLI, the demo
and the sweep runner, and `quantize(model, rules, method=..., calibration=...)` for any NNX model.
"""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lowbit.ptq.result import PTQResult

# Arguments a method function takes positionally (not options a user sets by name).
_POSITIONAL = ("model", "calibration", "spec", "weights", "act_bits", "observer", "budget",
               "source", "gguf_type", "workdir")


@dataclasses.dataclass(frozen=True)
class Method:
    """One PTQ method.

    name: the registry key ("gptq"); summary: one line for help texts;
    calibrated: whether it needs calibration data; default_weights: the weight spec the CLI
    uses when none is given (None: the method takes no weight spec, or a llama.cpp type);
    any_model: whether `quantize` runs it on any NNX model through rules (else the built-in
    Llama only); function: the library function behind it (its keyword arguments are the
    method's options); check_weights: validates a weight spec for this method (or None).
    """

    name: str
    summary: str
    calibrated: bool
    default_weights: str | None
    any_model: bool
    function: Callable[..., PTQResult]
    check_weights: Callable[[Any], Any] | None = None

    def options(self) -> dict[str, Any]:
        """The method's options: name -> default (inspect.Parameter.empty when required)."""
        parameters = inspect.signature(self.function).parameters
        return {name: p.default for name, p in parameters.items()
                if name not in _POSITIONAL and p.kind is not inspect.Parameter.VAR_KEYWORD}

    def check_options(self, options: dict[str, Any], where: str = "options") -> None:
        """ValueError naming every option this method does not take."""
        allowed = self.options()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: method {self.name!r} takes no option(s) {unknown}; "
                             f"its options: {sorted(allowed)}")


def _rtn(model, weights, calibration, **options):
    from lowbit.ptq.rtn import rtn_quantize

    return rtn_quantize(model, weights, **options)


def _with_calibration(function_path: str):
    """A runner for a method function called as f(model, calibration, weights, **options)."""
    def run(model, weights, calibration, **options):
        return _function(function_path)(model, calibration, weights, **options)
    return run


def _llm_int8(model, weights, calibration, **options):
    from lowbit.ptq.llm_int8 import llm_int8_quantize

    return llm_int8_quantize(model, weights, **options)


def _act(model, weights, calibration, **options):
    from lowbit.ptq.act_quant import act_quantize

    if "act_bits" not in options or "act_observer" not in options:
        raise ValueError("method 'act' needs options act_bits and act_observer")
    return act_quantize(model, calibration, options.pop("act_bits"), options.pop("act_observer"),
                        **options)


def _mixed(model, weights, calibration, **options):
    from lowbit.ptq.mixed import mixed_quantize

    if "budget" not in options:
        raise ValueError("method 'mixed' needs option budget (bits per weight)")
    return mixed_quantize(model, calibration, options.pop("budget"), **options)


def _llamacpp(model, weights, calibration, *, source=None, **options):
    from lowbit.ptq.llamacpp import llamacpp_quantize_model

    if source is None:
        raise ValueError("method 'llamacpp' needs the source GGUF path of the model (source=)")
    with tempfile.TemporaryDirectory() as workdir:
        return llamacpp_quantize_model(model, source, weights, workdir, **options)


def _function(path: str) -> Callable:
    import importlib

    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


@dataclasses.dataclass(frozen=True)
class _Entry:
    summary: str
    calibrated: bool
    default_weights: str | None
    any_model: bool
    runner: Callable
    function: str
    check_weights: str | None


_ENTRIES: dict[str, _Entry] = {
    "rtn": _Entry("round to nearest, no data", False, "int4:g64:asym", True, _rtn,
                  "lowbit.ptq.rtn.rtn_quantize", "lowbit.ptq.rtn.parse_weight_spec"),
    "gptq": _Entry("GPTQ: rounding errors pushed through the inverse input Hessian", True,
                   "int4:g64:asym", True, _with_calibration("lowbit.ptq.gptq.gptq_quantize"),
                   "lowbit.ptq.gptq.gptq_quantize", "lowbit.ptq.gptq.check_gptq_spec"),
    "awq": _Entry("AWQ: activation-aware per-channel scales, then RTN", True, "int4:g64:asym",
                  True, _with_calibration("lowbit.ptq.awq.awq_quantize"),
                  "lowbit.ptq.awq.awq_quantize", "lowbit.ptq.awq.check_awq_spec"),
    "blockap": _Entry("Block-AP: each block's weights and scales trained through the STE to "
                      "reproduce the float block (OmniQuant LWC with learn='clip')", True,
                      "int4:g64:asym", True,
                      _with_calibration("lowbit.ptq.block_ap.block_ap_quantize"),
                      "lowbit.ptq.block_ap.block_ap_quantize",
                      "lowbit.ptq.block_ap.check_block_ap_spec"),
    "smoothquant": _Entry("SmoothQuant W8A8: activation outliers migrated into the weights",
                          True, "int8:channel", True,
                          _with_calibration("lowbit.ptq.smoothquant.smoothquant_quantize"),
                          "lowbit.ptq.smoothquant.smoothquant_quantize",
                          "lowbit.ptq.smoothquant.check_w8a8_weight_spec"),
    "llm_int8": _Entry("LLM.int8(): int8 weights, outlier input features in float", False,
                       "int8:channel", True, _llm_int8,
                       "lowbit.ptq.llm_int8.llm_int8_quantize",
                       "lowbit.ptq.smoothquant.check_w8a8_weight_spec"),
    "act": _Entry("static activation quantization (Llama recipe: weights untouched; quantize(): "
                  "RTN weights by the rules)", True, None, True,
                  _act, "lowbit.ptq.act_quant.act_quantize", None),
    "mixed": _Entry("mixed precision meeting a bits-per-weight budget (candidates quantized by "
                    "RTN or GPTQ: option base)", True, None, False,
                    _mixed, "lowbit.ptq.mixed.mixed_quantize", None),
    "llamacpp": _Entry("llama.cpp's quantizer on the source GGUF (weights: a llama.cpp type)",
                       False, None, False, _llamacpp, "lowbit.ptq.llamacpp.llamacpp_quantize_model",
                       None),
}
METHOD_NAMES = tuple(_ENTRIES)


def get_method(name: str) -> Method:
    """The registered method called `name`; ValueError listing the names otherwise."""
    if name not in _ENTRIES:
        raise ValueError(f"method must be one of {list(METHOD_NAMES)}, got {name!r}")
    entry = _ENTRIES[name]
    return Method(name, entry.summary, entry.calibrated, entry.default_weights, entry.any_model,
                  _function(entry.function),
                  None if entry.check_weights is None else _function(entry.check_weights))


def run_method(name: str, model, weights, calibration=None, **options) -> PTQResult:
    """Runs a registered method on a built-in Llama model in place: the one dispatcher behind
    `lowbit quantize`, the demo table and the sweep runner.

    weights: the weight spec (a llama.cpp type for "llamacpp"; ignored by "act" and "mixed");
    calibration: int tokens [samples, seq] (required when the method is calibrated);
    options: the method's keyword options (see Method.options), plus act_bits/act_observer for
    "act", budget for "mixed" and source (the GGUF path) for "llamacpp".
    """
    method = get_method(name)
    if method.calibrated and calibration is None:
        raise ValueError(f"method {name!r} needs calibration tokens")
    return _ENTRIES[name].runner(model, weights, calibration, **options)


def _llama_spec(model, targets, method: str):
    """The one weight spec that rules give every block linear of a built-in Llama (the
    Llama-only methods quantize all of them alike)."""
    from lowbit.ptq.driver import linear_paths

    expected = linear_paths(len(model.layers))
    chosen = {t.path: t.spec for t in targets}
    specs = set(chosen.values())
    if sorted(chosen) != sorted(expected) or len(specs) != 1:
        raise ValueError(f"method {method!r} quantizes every block linear of the Llama with one "
                         "spec: give one rule such as QuantRule(path=lowbit.ptq.driver."
                         f"LLAMA_BLOCK_LINEARS, weight_spec=...); the rules chose "
                         f"{len(chosen)} of {len(expected)} linears with {len(specs)} spec(s)")
    return specs.pop()


# Packed layers carry the online transform.
ROTATABLE_METHODS = ("rtn", "gptq", "awq", "blockap", "mixed")


def quantize(model, rules, method: str = "rtn", calibration=None, *, runtime: str = "packed",
             blocks=None, progress: bool = False, rotate: bool = False, rotation_seed: int = 0,
             **options) -> PTQResult:
    """Post-training quantization of any Flax NNX model in place; the quantized layers become
    packed layers (codes, scales; no float copy).

    rules: lowbit.nn.QuantRule(s): a path regex (re.fullmatch over dotted module paths such as
      "layers.3.attn.wq" or "conv1") and a weight_spec; first match wins, keep_float shields.
      nnx.Linear, LinearGeneral, Einsum and Conv are quantized as one [K, N] matrix each
      (groups along the contracted axes K, see lowbit.nn.contraction); a rule matching anything
      else, or nothing, is a ValueError; kernels no rule matches stay float (with a warning).
    method: a name of METHOD_NAMES. "rtn", "gptq", "awq", "smoothquant", "llm_int8" and "act"
      run on any model with each rule's spec ("smoothquant" and "llm_int8": symmetric int8
      weights; W8A8 / LLM.int8() layers over the layer's contraction; "act": RTN weights plus
      static input quantization, options act_bits and act_observer). AWQ and SmoothQuant share
      one scale among the layers that read the same input: groups declared with
      scale_groups=[lowbit.ptq.scaling.ScaleGroup(members, fold)] or the model's
      ptq_scale_groups() (the built-in Llama's are lowbit.ptq.scaling.llama_scale_groups),
      else derived from the tensors the layers were fed; 1/s folds into a declared norm or
      layer, or into the norm that produced a derived group's input (each fold checked to keep
      the block's function), else stays in the quantized layer as an input scale. "mixed" and "llamacpp" need
      the built-in Llama and one spec for all its block linears ("mixed" only selects them by
      it; its allocation picks each one's spec from its candidates). run_method keeps the Llama
      recipes of `lowbit quantize` (AWQ's attention / MLP output losses) unchanged.
    calibration: a list of batches, each what the model's __call__ takes (for the built-in
      Llama: int token arrays [batch, seq]). The sequential driver walks the model's blocks
      (lowbit.ptq.driver.ModelBlocks: a model's ptq_blocks() method, the Llama's layers, or
      the whole model as one block); pass blocks= to choose them.
    runtime: "packed" (default: packed matmul over the codes) or "dequant" (fake-quant float
      execution of the same codes, for research).
    options: the method's options (get_method(method).options()), e.g. act_order=True; "mixed"
      also takes budget= (bits per weight), "llamacpp" source= (the GGUF path).
    rotate: first rotate the float model (lowbit.ptq.rotation.rotate_model: norm gains folded,
      randomized Hadamard residual / value-head rotations, an online Hadamard before each MLP
      down projection; the model's rotation_plan() or the Llama's; seed rotation_seed), then
      quantize; methods in ROTATABLE_METHODS. AWQ then keeps no scale fold into an online
      transform's producer. The down projections' packed layers carry the online transform.
    Returns a PTQResult (per-layer QArrays and errors, bits per weight, time).
    """
    from lowbit.ptq.targets import check_rules, check_runtime, resolve_targets

    get_method(method)  # an unknown name is a ValueError here
    check_runtime(runtime)
    start = time.perf_counter()
    plan = None
    if not isinstance(rotate, bool):
        raise ValueError(f"rotate must be True or False, got {rotate!r}")
    if rotate and method not in ROTATABLE_METHODS:
        raise ValueError(f"rotate=True needs a method of {list(ROTATABLE_METHODS)}, got {method!r}")
    # every check that needs no work runs before a rotation changes the model in place
    targets = resolve_targets(model, rules, warn_unmatched=not rotate)
    llama_inputs = None
    if method in _ANY_MODEL_OPTIONS:
        _only(options, _ANY_MODEL_OPTIONS[method], method)
    else:
        llama_inputs = _check_llama_only(model, targets, method, calibration, blocks, options)
    if rotate:
        from lowbit.ptq.rotation import rotate_model, rotated_scale_groups

        plan = rotate_model(model, seed=rotation_seed)
        if method == "awq":
            options["scale_groups"] = rotated_scale_groups(model, plan,
                                                           options.get("scale_groups"))
        targets = resolve_targets(model, rules)
    settings = {"rules": [repr(r) for r in check_rules(rules)], "runtime": runtime,
                **options}
    if rotate:
        settings["rotate"] = {"seed": rotation_seed}
    if llama_inputs is not None:
        result = _llama_only(model, llama_inputs, method, calibration, runtime, progress, options)
        result.settings.update({k: settings[k] for k in ("rules", "runtime", "rotate") if k in settings})
    else:
        linears, reports = _apply_any_model(method, model, targets, calibration, runtime, blocks,
                                            progress, options)
        settings = {key: (repr(value) if key == "scale_groups" else
                          str(value) if key == "workdir" and value is not None else value)
                    for key, value in settings.items()}
        result = PTQResult(method=method, linears=linears, seconds=time.perf_counter() - start,
                           settings=settings, block_reports=reports)
    if plan is not None:
        from lowbit.ptq.rotation import carry_online_transforms

        carry_online_transforms(model, plan)
    return result


def _apply_any_model(method, model, targets, calibration, runtime, blocks, progress, options):
    """The registry's any-model methods: (path -> QuantizedLinear, per-block reports)."""
    reports: list = []
    if method == "rtn":
        from lowbit.ptq.rtn import rtn_apply

        linears = rtn_apply(model, targets, runtime=runtime, **options)
    elif method == "gptq":
        from lowbit.ptq.gptq import gptq_apply

        linears = gptq_apply(model, targets, calibration, runtime=runtime, blocks=blocks,
                             progress=progress, **options)
    elif method == "awq":
        from lowbit.ptq.awq import awq_apply

        linears, reports = awq_apply(model, targets, calibration, runtime=runtime, blocks=blocks,
                                     progress=progress, **options)
    elif method == "blockap":
        from lowbit.ptq.block_ap import block_ap_apply

        linears, reports = block_ap_apply(model, targets, calibration, runtime=runtime,
                                          blocks=blocks, progress=progress, **options)
    elif method == "smoothquant":
        from lowbit.ptq.smoothquant import smoothquant_apply

        linears, reports = smoothquant_apply(model, targets, calibration, blocks=blocks,
                                             progress=progress, **options)
    elif method == "llm_int8":
        from lowbit.ptq.llm_int8 import llm_int8_apply

        linears = llm_int8_apply(model, targets, **options)
    else:
        from lowbit.ptq.act_quant import act_apply

        if "act_bits" not in options or "act_observer" not in options:
            raise ValueError("method 'act' needs options act_bits and act_observer")
        kwargs = dict(options)
        linears, reports = act_apply(model, targets, calibration, kwargs.pop("act_bits"),
                                     kwargs.pop("act_observer"), runtime=runtime, blocks=blocks,
                                     progress=progress, **kwargs)
    return linears, reports


# The options each method takes in `quantize` (any model); the others run on the Llama only.
_ANY_MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "rtn": ("observer",),
    "gptq": ("act_order", "static_groups", "block_size", "damp"),
    "awq": ("grid", "clip", "clip_ratios", "search_tokens", "clip_tokens", "scale_groups"),
    "blockap": ("steps", "learn", "init", "weight_lr", "scale_lr", "workdir"),
    "smoothquant": ("act", "alpha", "scale_groups"),
    "llm_int8": ("threshold", "max_outliers"),
    "act": ("act_bits", "act_observer", "granularity", "sample_tokens", "percentile"),
}


# The argument each Llama-only method needs besides its options (run_method's extras).
_LLAMA_ONLY_ARGUMENT = {"mixed": "budget", "llamacpp": "source"}


def _check_llama_only(model, targets, method, calibration, blocks, options):
    """The checks of a Llama-only method ("mixed", "llamacpp") that need no work: the built-in
    Llama, one spec for all its block linears, known options, its required argument and
    calibration when it is calibrated. Returns (the spec, calibration tokens or None)."""
    from lowbit.models.llama import Llama

    if not isinstance(model, Llama) or blocks is not None:
        raise ValueError(f"method {method!r} runs on the built-in Llama only; on other models "
                         f"use one of {list(_ANY_MODEL_OPTIONS)}")
    entry = get_method(method)
    spec = _llama_spec(model, targets, method)
    argument = _LLAMA_ONLY_ARGUMENT[method]
    entry.check_options({k: v for k, v in options.items() if k != argument})
    if argument not in options:
        raise ValueError(f"method {method!r} needs option {argument}")
    tokens = None
    if calibration is not None:
        from lowbit.ptq.driver import check_batches

        tokens = np.concatenate([np.asarray(b) for b in check_batches(calibration)], axis=0)
    elif entry.calibrated:
        raise ValueError(f"method {method!r} needs calibration batches")
    return spec, tokens


def _llama_only(model, checked, method, calibration, runtime, progress, options) -> PTQResult:
    """"mixed" and "llamacpp" on the built-in Llama: checked is _check_llama_only's (spec, tokens)
    ("mixed" only uses the spec to select the linears); a calibrated method takes its batches'
    size as batch_size."""
    spec, tokens = checked
    entry = get_method(method)
    kwargs = dict(options)
    if "progress" in entry.options():
        kwargs["progress"] = progress
    if "runtime" in entry.options():
        kwargs["runtime"] = runtime
    if "batch_size" in entry.options() and calibration is not None:
        kwargs.setdefault("batch_size", len(calibration[0]))
    return run_method(method, model, spec, tokens, **kwargs)


def _only(options: dict[str, Any], allowed: tuple[str, ...], method: str) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} takes no option(s) {unknown} in ptq.quantize; "
                         f"its options: {list(allowed)}")
