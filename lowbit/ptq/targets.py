"""Which layers of a model a PTQ run quantizes (QuantRule paths over any NNX model) and how a
quantized weight goes back into the model: as a packed layer, never as a float copy.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from flax import nnx

from lowbit.core.quantize import QArray
from lowbit.core.spec import QuantSpec
from lowbit.nn import QuantRule
from lowbit.nn.contraction import Contraction, contraction_of, supported_base

RUNTIMES = ("packed", "dequant")


@dataclasses.dataclass(frozen=True)
class Target:
    """One layer a PTQ method quantizes: its dotted path, the rule that chose it, its
    Contraction (how its kernel is one [K, N] matrix) and the weight spec (groups along K)."""

    path: str
    rule_index: int
    contraction: Contraction
    spec: QuantSpec


def check_runtime(runtime: str) -> str:
    """"packed" (codes in memory, packed matmul) or "dequant" (fake-quant float execution)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    return runtime


def check_rules(rules) -> tuple[QuantRule, ...]:
    """A tuple of QuantRules from one rule or a sequence of them."""
    if isinstance(rules, QuantRule):
        rules = (rules,)
    if isinstance(rules, (str, bytes)) or not hasattr(rules, "__iter__"):
        raise ValueError(f"rules must be a QuantRule or a sequence of them, got {rules!r}")
    rules = tuple(rules)
    if not rules:
        raise ValueError("rules is empty; give at least one QuantRule(path=..., weight_spec=...)")
    for i, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise ValueError(f"rules[{i}] must be a QuantRule, got {type(rule).__name__}")
    return rules


def dotted(path) -> str:
    return ".".join(str(part) for part in path)


def kernel_modules(model: nnx.Module) -> list[tuple[str, Any]]:
    """(dotted path, module) of every module holding a `kernel` variable, in graph order."""
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "kernel", None), nnx.Variable):
            found.append((dotted(path), node))
    return found


def resolve_targets(model: nnx.Module, rules, *, warn_unmatched: bool = True) -> list[Target]:
    """The layers the rules quantize, first matching rule wins, in graph order.

    A rule with keep_float=True shields what it matches. A matched layer that is not an
    nnx.Linear, LinearGeneral, Einsum or Conv (or a subclass with its own __call__) is a
    ValueError; a rule that matches nothing is a ValueError; layers with a kernel that no rule
    matched stay float and are listed in a warning (warn_unmatched=False silences it).
    """
    rules = check_rules(rules)
    targets, used, unmatched = [], set(), []
    for path, module in kernel_modules(model):
        index = next((i for i, rule in enumerate(rules) if rule.matches(path)), None)
        if index is None:
            unmatched.append(path)
            continue
        used.add(index)
        rule = rules[index]
        if rule.keep_float:
            continue
        if rule.weight_spec is None:
            raise ValueError(f"rules[{index}] {rule!r} matches {path!r} but has no weight_spec; "
                             "PTQ needs one (or keep_float=True)")
        if supported_base(module) is None:
            raise ValueError(f"rules[{index}] {rule!r} matches {path!r}, a "
                             f"{type(module).__name__}, which PTQ cannot quantize; supported: "
                             "nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv (narrow the "
                             "rule's path or add a keep_float rule before it)")
        contraction = contraction_of(module, path)
        spec = rule.weight_spec
        if spec.granularity == "token":
            raise ValueError(f"rules[{index}] weight_spec {str(spec)!r} uses token granularity, "
                             "which is for activations")
        if spec.granularity == "group" and spec.group_size > contraction.in_features:
            raise ValueError(f"rules[{index}] weight_spec {str(spec)!r}: group size "
                             f"{spec.group_size} exceeds the {contraction.in_features} "
                             f"contracted features of {path!r}")
        targets.append(Target(path, index, contraction, spec))
    idle = [rule for i, rule in enumerate(rules) if i not in used]
    if idle:
        paths = [p for p, _ in kernel_modules(model)]
        raise ValueError(f"rules matched no layer: {idle}; layers with a kernel: {paths[:8]}"
                         f"{' ...' if len(paths) > 8 else ''}")
    if unmatched and warn_unmatched:
        warnings.warn(f"{len(unmatched)} layer(s) with a kernel match no rule and stay float: "
                      f"{unmatched[:8]}{' ...' if len(unmatched) > 8 else ''}", stacklevel=3)
    if not targets:
        raise ValueError("the rules select no layer to quantize (every match is keep_float)")
    return targets


def module_at(root: Any, path: str) -> Any:
    """The submodule at a dotted path ("layers.3.attn.wq"); integers index lists."""
    node = root
    if not path:
        return node
    for part in path.split("."):
        try:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(f"no module at path {path!r} (failed at {part!r})") from None
    return node


def replace_module(root: Any, path: str, module: Any) -> None:
    """Puts `module` at a dotted path, replacing what was there."""
    parent_path, _, last = path.rpartition(".")
    parent = module_at(root, parent_path)
    if last.isdigit():
        parent[int(last)] = module
    elif hasattr(parent, last):
        setattr(parent, last, module)
    else:
        raise ValueError(f"no module at path {path!r}")


def install_packed(root: Any, path: str, weight: QArray, runtime: str = "packed") -> Any:
    """Replaces the layer at `path` by a packed layer holding `weight` (a QArray of the
    layer's [K, N] matrix); its float kernel is dropped. Returns the new layer."""
    from lowbit.nn.packed_layer import packed_layer

    layer = packed_layer(module_at(root, path), weight, runtime=check_runtime(runtime))
    replace_module(root, path, layer)
    return layer
