"""Rules that convert a float model's nnx.Linear / LinearGeneral / Einsum / Conv layers to
fake-quantized layers, in place: `quantize_model(model, rules)`; the first matching rule wins.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

from flax import nnx

from lowbit.core.spec import QuantSpec
from lowbit.nn.contraction import SUPPORTED_TYPES, check_module
from lowbit.nn.gguf_layers import GgufEmbed
from lowbit.nn.packed_layer import LAYER_CLASSES
from lowbit.nn.packed_linear import module_at, set_child
from lowbit.nn.quant_linear import (ACT_ESTIMATORS, WEIGHT_ESTIMATORS, BinaryLinear, BitLinear,
                                    QuantLayer, QuantLinear, as_spec)

LAYER_NAMES = {"quant": QuantLinear, "bitlinear": BitLinear, "binary": BinaryLinear}
_OPTION_FIELDS = ("act_clip_init", "learn_clip", "lsq_grad_scale")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    """Which layers to quantize and how (frozen, keyword-only; specs may be given as strings).

    path: a regex that must match the whole module path (re.fullmatch), e.g.
      r"layers\\.\\d+\\.attn\\.w[qkv]" for "layers.3.attn.wq".
    layer: QuantLinear, BitLinear or BinaryLinear (or "quant", "bitlinear", "binary"): the
      recipe. An nnx.Linear becomes that class; an nnx.LinearGeneral / Einsum / Conv becomes a
      QuantLayer with the class's defaults (BitLinear: ternary weights, int8 per-row inputs,
      input RMS norm).
    weight_spec / act_spec: QuantSpec or string; BitLinear and BinaryLinear supply their own
      defaults when None; QuantLinear needs a weight_spec. act_spec None: no input quantization.
    estimator / act_estimator / act_clip_init / learn_clip / lsq_grad_scale: as in QuantLayer.
    input_norm: RMS-normalize the inputs without a learnable scale (BitNet's BitLinear norm);
      None keeps the layer class's default (on for BitLinear / BinaryLinear, off for QuantLinear).
    keep_float: leave the matched layers as they are (a rule that shields layers from later rules).
    """

    path: str = ".*"
    layer: Any = QuantLinear
    weight_spec: QuantSpec | str | None = None
    act_spec: QuantSpec | str | None = None
    estimator: str = "identity"
    act_estimator: str | None = None
    act_clip_init: float | str = 10.0
    learn_clip: bool = True
    lsq_grad_scale: bool = True
    input_norm: bool | None = None
    keep_float: bool = False

    def __post_init__(self):
        if not isinstance(self.path, str):
            raise ValueError(f"{self!r}: path must be a regex string, got {type(self.path).__name__}")
        try:
            object.__setattr__(self, "_pattern", re.compile(self.path))
        except re.error as error:
            raise ValueError(f"{self!r}: path {self.path!r} is not a valid regex: {error}") from None
        layer = self.layer
        if isinstance(layer, str):
            if layer not in LAYER_NAMES:
                raise ValueError(f"{self!r}: layer must be one of {sorted(LAYER_NAMES)} or a class, got {layer!r}")
            object.__setattr__(self, "layer", LAYER_NAMES[layer])
        elif not (isinstance(layer, type) and issubclass(layer, QuantLinear)):
            raise ValueError(f"{self!r}: layer must be QuantLinear, BitLinear, BinaryLinear or one of "
                             f"{sorted(LAYER_NAMES)}, got {layer!r}")
        for name in ("weight_spec", "act_spec"):
            try:
                object.__setattr__(self, name, as_spec(getattr(self, name), name))
            except ValueError as error:
                raise ValueError(f"{self!r}: {error}") from None
        if self.estimator not in WEIGHT_ESTIMATORS:
            raise ValueError(f"{self!r}: estimator must be one of {WEIGHT_ESTIMATORS}, got {self.estimator!r}")
        if self.input_norm is not None and not isinstance(self.input_norm, bool):
            raise ValueError(f"{self!r}: input_norm must be True, False or None, got {self.input_norm!r}")
        if self.act_estimator is not None and self.act_estimator not in ACT_ESTIMATORS:
            raise ValueError(f"{self!r}: act_estimator must be one of {ACT_ESTIMATORS} or None, "
                             f"got {self.act_estimator!r}")
        if not self.keep_float and self.layer is QuantLinear and self.weight_spec is None:
            raise ValueError(f"{self!r}: a QuantLinear rule needs a weight_spec (or keep_float=True)")

    def __repr__(self) -> str:
        parts = [f"path={self.path!r}"]
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if isinstance(value, type):
                if value is not field.default:
                    parts.append(f"{field.name}={value.__name__}")
            elif value != field.default:
                parts.append(f"{field.name}={str(value) if isinstance(value, QuantSpec) else value!r}")
        return f"QuantRule({', '.join(parts)})"

    def matches(self, path: str) -> bool:
        """Whether the dotted module path (e.g. 'layers.3.attn.wq') matches this rule."""
        return self._pattern.fullmatch(path) is not None

    def layer_options(self) -> dict:
        """Keyword arguments for the layer class (None specs fall back to the class defaults)."""
        options = {name: getattr(self, name) for name in _OPTION_FIELDS}
        options["estimator"] = self.estimator
        if self.act_estimator is not None:
            options["act_estimator"] = self.act_estimator
        if self.input_norm is not None:
            options["input_norm"] = self.input_norm
        for name in ("weight_spec", "act_spec"):
            if getattr(self, name) is not None or self.layer is QuantLinear:
                options[name] = getattr(self, name)
        return options

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRule":
        """From a TOML table; unknown keys raise ValueError naming the key."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown rule key(s) {unknown}; allowed keys: {allowed}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    """layers: module path -> index of the rule that converted it (or kept it float);
    unmatched: the rules no layer used; unquantized: paths of layers with a kernel that no rule
    matched (they stay float)."""

    layers: dict
    unmatched: tuple
    unquantized: tuple = ()


def dotted(path) -> str:
    return ".".join(str(key) for key in path)


def _is_quantized(node) -> bool:
    return isinstance(node, QuantLayer) or type(node).__name__ in LAYER_CLASSES


def kernel_layers(model: nnx.Module) -> list[tuple]:
    """(path tuple, module) of every layer a rule may name, in graph order: the supported float
    types, already quantized layers, and any other module holding a `kernel` Variable."""
    found = []
    for path, node in nnx.iter_graph(model):
        if not path or not isinstance(node, nnx.Module) or isinstance(node, GgufEmbed):
            continue  # a block-quantized embedding is not a layer a rule converts
        if isinstance(node, SUPPORTED_TYPES) or _is_quantized(node) or \
                isinstance(getattr(node, "kernel", None), nnx.Variable):
            found.append((path, node))
    return found


def _check_rules(rules) -> tuple:
    if isinstance(rules, QuantRule):
        rules = (rules,)
    rules = tuple(rules)
    for i, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise ValueError(f"rules[{i}] must be a QuantRule, got {type(rule).__name__}")
    return rules


def _assign(layers, rules) -> dict:
    """Map each layer path to the index of the first rule that matches it."""
    chosen = {}
    for path, _ in layers:
        name = dotted(path)
        for i, rule in enumerate(rules):
            if rule.matches(name):
                chosen[path] = i
                break
    return chosen


def unmatched_rules(model: nnx.Module, rules) -> list[QuantRule]:
    """Rules that no layer of `model` would use (no path matches, or earlier rules take every
    layer they match). The model is not changed."""
    rules = _check_rules(rules)
    used = set(_assign(kernel_layers(model), rules).values())
    return [rule for i, rule in enumerate(rules) if i not in used]


def _convert(module, rule: QuantRule, name: str):
    """The fake-quantized layer for one matched module (ValueError naming the path if unsupported)."""
    if _is_quantized(module):
        raise ValueError(f"{name}: {type(module).__name__} is already quantized; quantize_model converts "
                         "float layers once (keep_float=True rules may name quantized layers)")
    base = check_module(module, name)
    options = rule.layer_options()
    if base is nnx.Linear:
        return rule.layer.from_linear(module, path=name, **options)
    return QuantLayer.from_module(module, path=name, **{**rule.layer.defaults, **options})


def quantize_model(model: nnx.Module, rules, *, raise_on_unmatched: bool = False,
                   warn: bool = True) -> QuantizeReport:
    """Convert the model's nnx.Linear / LinearGeneral / Einsum / Conv layers in place, first
    matching rule wins (nnx.Linear -> the rule's class, the others -> QuantLayer).

    Each new layer adopts the old kernel (and bias) Param: no second copy of the weights. Every
    layer is built and checked before any is swapped in, so a failure leaves the model unchanged.
    ValueError, naming the path and type, when a (not keep_float) rule matches: a layer of another
    type that holds a kernel (e.g. nnx.ConvTranspose), a subclass with its own __call__, an already
    quantized layer, or a layer the rule's spec cannot take (e.g. a group larger than K).
    warn (default): warnings.warn about rules that matched nothing and about layers with a kernel
    that no rule matched (they stay float; the report lists them). raise_on_unmatched: raise
    ValueError instead when a rule matched nothing.
    """
    rules = _check_rules(rules)
    if isinstance(model, SUPPORTED_TYPES) or _is_quantized(model):
        raise ValueError(f"model must contain layers, not be one ({type(model).__name__}); build a layer "
                         "directly with QuantLayer.from_module(module, ...) or QuantLinear.from_linear(linear, ...)")
    layers = kernel_layers(model)
    chosen = _assign(layers, rules)
    used = set(chosen.values())
    unmatched = tuple(rule for i, rule in enumerate(rules) if i not in used)
    if unmatched:
        message = (f"rules matched no layer: {list(unmatched)}; "
                   f"layer paths look like {[dotted(p) for p, _ in layers][:6]}")
        if raise_on_unmatched:
            raise ValueError(message)
        if warn:
            warnings.warn(message, stacklevel=2)
    unquantized = tuple(dotted(p) for p, node in layers if p not in chosen and not _is_quantized(node))
    replacements = []
    for path, module in layers:
        if path not in chosen or rules[chosen[path]].keep_float:
            continue
        i, name = chosen[path], dotted(path)
        try:
            new = _convert(module, rules[i], name)
        except ValueError as error:
            raise ValueError(f"rules[{i}] {rules[i]!r} cannot quantize layer {name!r} "
                             f"({type(module).__name__}, kernel {tuple(module.kernel.shape) if hasattr(module, 'kernel') else '-'}): "
                             f"{error}") from None
        replacements.append((path, new))
    for path, new in replacements:
        set_child(module_at(model, path[:-1]), path[-1], new)
    if unquantized and warn:
        warnings.warn(f"{len(unquantized)} layer(s) with a kernel matched no rule and stay float: "
                      f"{list(unquantized)[:8]}{' ...' if len(unquantized) > 8 else ''} "
                      "(add a keep_float=True rule to silence this, or warn=False)", stacklevel=2)
    return QuantizeReport({dotted(p): i for p, i in chosen.items()}, unmatched, unquantized)


BLOCK_LINEARS = r"layers\.\d+\..*"

PRESETS = {
    "fp32": (),
    "ternary": (QuantRule(path=BLOCK_LINEARS, layer=BitLinear),),
    "binary": (QuantRule(path=BLOCK_LINEARS, layer=BinaryLinear),),
    "int4-lsq": (QuantRule(path=BLOCK_LINEARS, weight_spec="int4:channel", estimator="lsq"),),
    "w4a8-lsq": (QuantRule(path=BLOCK_LINEARS, weight_spec="int4:channel", act_spec="int8:token:f32",
                           estimator="lsq"),),
    "w4a4-lsq": (QuantRule(path=BLOCK_LINEARS, weight_spec="int4:channel", act_spec="int4",
                           estimator="lsq"),),
    "int4-g64": (QuantRule(path=BLOCK_LINEARS, weight_spec="int4:g64"),),
    "w8a8": (QuantRule(path=BLOCK_LINEARS, weight_spec="int8:channel", act_spec="int8:token:f32"),),
}


def preset_rules(name: str) -> tuple:
    """Named rule sets over the decoder blocks' linears (embeddings and head stay float):
    fp32 (none), ternary (BitLinear), binary (BinaryLinear), int4-lsq (int4 per-channel LSQ
    weights), w4a8-lsq (and int8 per-token inputs, as BitLinear's), w4a4-lsq (and LSQ int4
    inputs), int4-g64 (groups of 64), w8a8 (int8 channel / token)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
