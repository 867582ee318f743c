"""Per-input-channel scales shared by layers that read the same input (AWQ, SmoothQuant) on any NNX
model: which layers share an input (declared by the model, or derived from the calibration run)
and where 1/s goes (folded into a preceding norm or layer, else kept in the quantized layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.ptq.targets import module_at

FOLD_TOLERANCE = 1e-4  # relative change of a block's output that a fold may cause (f32 rounding)


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Layers reading the same input, so they share one per-input-channel scale s.

    members: dotted model paths of the layers (they must be fed the same tensor);
    fold: the dotted path of the op whose output is that input and which takes 1/s: a norm
      (nnx.LayerNorm / RMSNorm `scale` and `bias`, or a `weight` vector: divided by s) or a
      Linear-like layer (its output columns and bias divided by s); None: each member keeps 1/s
      as an input scale on its rows (exact, K multiplies per row).
    no_clip: members AWQ's clipping search leaves alone (Llama: q and k, as llm-awq).
    A model declares its groups with a `ptq_scale_groups()` method returning ScaleGroups (or
    pass scale_groups= to lowbit.ptq.quantize); layers in no declared group are grouped by the
    input tensor they were actually fed during calibration, with no fold.
    """

    members: tuple[str, ...]
    fold: str | None = None
    no_clip: tuple[str, ...] = ()

    def __post_init__(self):
        members = tuple(self.members) if not isinstance(self.members, str) else (self.members,)
        if not members or not all(isinstance(m, str) for m in members):
            raise ValueError(f"ScaleGroup members must be a non-empty sequence of dotted paths, "
                             f"got {self.members!r}")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "no_clip", tuple(self.no_clip))
        if self.fold is not None and not isinstance(self.fold, str):
            raise ValueError(f"ScaleGroup fold must be a dotted path or None, got {self.fold!r}")


def llama_scale_groups(model) -> list[ScaleGroup]:
    """The built-in Llama's groups: q/k/v share the attention norm's output, gate/up the MLP
    norm's; o's input folds into v's output columns when they match (no GQA), down's into up's
    columns (silu(gate) * up is linear in up)."""
    groups = []
    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        v_out = block.attn.wv.kernel.shape[1]
        o_in = block.attn.wo.kernel.shape[0]
        groups += [
            ScaleGroup((f"{p}.attn.wq", f"{p}.attn.wk", f"{p}.attn.wv"), f"{p}.attn_norm",
                       no_clip=(f"{p}.attn.wq", f"{p}.attn.wk")),
            ScaleGroup((f"{p}.attn.wo",), f"{p}.attn.wv" if v_out == o_in else None),
            ScaleGroup((f"{p}.mlp.w_gate", f"{p}.mlp.w_up"), f"{p}.ffn_norm"),
            ScaleGroup((f"{p}.mlp.w_down",), f"{p}.mlp.w_up"),
        ]
    return groups


def declared_groups(model, scale_groups=None) -> list[ScaleGroup]:
    """`scale_groups` if given, else the model's `ptq_scale_groups()`, the built-in Llama's
    groups, or none (every group is then derived from the calibration run)."""
    from lowbit.models.llama import Llama

    if scale_groups is None:
        if hasattr(model, "ptq_scale_groups"):
            scale_groups = model.ptq_scale_groups()
        elif isinstance(model, Llama):
            scale_groups = llama_scale_groups(model)
        else:
            scale_groups = []
    if isinstance(scale_groups, ScaleGroup):
        scale_groups = [scale_groups]
    groups = list(scale_groups)
    for i, group in enumerate(groups):
        if not isinstance(group, ScaleGroup):
            raise ValueError(f"scale_groups[{i}] must be a lowbit.ptq.scaling.ScaleGroup, got "
                             f"{type(group).__name__}")
        for path in group.members + (() if group.fold is None else (group.fold,)):
            try:
                module_at(model, path)
            except ValueError:
                raise ValueError(f"scale_groups[{i}] {list(group.members)}: the model has no "
                                 f"module at {path!r}") from None
    return groups


@dataclasses.dataclass
class BlockGroup:
    """A group resolved inside one block: local member paths (targets only), the local fold path
    (None: in-layer input scales) and the members AWQ does not clip."""

    members: tuple[str, ...]
    fold: str | None
    no_clip: tuple[str, ...] = ()
    derived: bool = False  # the fold target was found, not declared: a failed check drops it


def _local(path: str, prefix: str) -> str | None:
    if prefix == "":
        return path
    return path[len(prefix) + 1:] if path.startswith(prefix + ".") else None


def _same_input(a: dict, b: dict) -> bool:
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-5, atol=1e-6):
            return False
    return True


def resolve_groups(context, declared: list[ScaleGroup], stats: dict[str, dict]
                   ) -> list[BlockGroup]:
    """The scale groups of one block (lowbit.ptq.driver.BlockInputs after `statistics`):
    declared groups first (members that are not quantized targets are left out, and then
    nothing is folded: 1/s would change their input), then one group per input tensor the
    remaining targets were fed. A declared group whose members' captured inputs differ, or a
    fold target outside the block, missing, or of the wrong width, is a ValueError naming the
    paths."""
    targets = context.targets
    covered: set[str] = set()
    groups = []
    for group in declared:
        local = [_local(m, context.path) for m in group.members]
        if all(m is None or m not in targets for m in local):
            continue
        chosen = tuple(m for m in local if m is not None and m in targets)
        first = chosen[0]
        for other in chosen[1:]:
            if context.owners[other] != context.owners[first] \
                    and not _same_input(stats[first], stats[other]):
                raise ValueError(f"scale group {list(group.members)}: {group.members[0]!r} and "
                                 f"{other if not context.path else context.path + '.' + other!r}"
                                 " were fed different inputs during calibration, so they cannot "
                                 "share one scale; fix the declared group")
        taken = [m for m in chosen if m in covered]
        if taken:
            raise ValueError(f"scale group {list(group.members)}: {taken} already belong to "
                             "another declared group")
        fold = None
        if group.fold is not None and len(chosen) == len(group.members):
            fold = _local(group.fold, context.path)
            if fold is None:
                raise ValueError(f"scale group {list(group.members)}: fold target "
                                 f"{group.fold!r} lies outside the block {context.path!r}")
            check_fold_target(context.block, fold, targets[first].contraction.in_features,
                              group.fold)
        covered.update(chosen)
        groups.append(BlockGroup(chosen, fold, tuple(m for m in chosen
                                                     if _full(context.path, m) in group.no_clip)))
    derived: dict[str, list[str]] = {}
    for local in targets:
        if local not in covered:
            derived.setdefault(context.owners[local], []).append(local)
    for members in derived.values():
        fold = context.producers.get(members[0])
        if fold is not None:
            try:
                check_fold_target(context.block, fold,
                                  targets[members[0]].contraction.in_features, fold)
            except ValueError:
                fold = None
        groups.append(BlockGroup(tuple(members), fold, derived=fold is not None))
    return groups


def _full(prefix: str, local: str | None) -> str | None:
    if local is None:
        return None
    return local if prefix == "" else f"{prefix}.{local}"


def _norm_vectors(module) -> list[nnx.Variable]:
    found = []
    for name in ("scale", "weight", "bias"):
        variable = getattr(module, name, None)
        if isinstance(variable, nnx.Variable) and variable.get_value() is not None:
            found.append(variable)
    return found


def check_fold_target(block, local: str, width: int, path: str) -> None:
    """ValueError unless the op at `local` can take 1/s over `width` channels: a float layer
    with `width` outputs, or a norm whose scale/weight (and bias) hold `width` values."""
    from lowbit.nn.contraction import contraction_of, supported_base

    try:
        module = module_at(block, local)
    except ValueError:
        raise ValueError(f"fold target {path!r} does not exist") from None
    if isinstance(getattr(module, "kernel", None), nnx.Variable):
        if supported_base(module) is None:
            raise ValueError(f"fold target {path!r} is a {type(module).__name__}; a layer fold "
                             "needs an nnx.Linear, LinearGeneral, Einsum or Conv")
        n = contraction_of(module, path).out_features
        if n != width:
            raise ValueError(f"fold target {path!r} has {n} outputs, the group's layers "
                             f"contract {width} features")
        return
    vectors = _norm_vectors(module)
    if not vectors or any(v.get_value().size != width for v in vectors):
        raise ValueError(f"fold target {path!r} ({type(module).__name__}) is neither a float "
                         f"layer nor a norm with {width}-wide scale/weight/bias vectors")


def fold_inverse(block, local: str, s) -> None:
    """Divides the output channels of the op at `local` by s (a layer's matrix columns and
    bias, or a norm's scale/weight and bias)."""
    from lowbit.nn.contraction import contraction_of

    module = module_at(block, local)
    if isinstance(getattr(module, "kernel", None), nnx.Variable):
        contraction = contraction_of(module, local)
        kernel = module.kernel[...]
        matrix = contraction.matrix(kernel.astype(jnp.float32)) / s[None, :]
        module.kernel.set_value(contraction.kernel_from_matrix(matrix).astype(kernel.dtype))
        bias = getattr(module, "bias", None)
        if bias is not None and bias.get_value() is not None:
            value = bias[...]
            size = value.size
            order = np.asarray(contraction.bias_row(jnp.arange(size).reshape(value.shape)))
            divisor = np.empty(size, np.float32)
            divisor[order] = np.asarray(s, np.float32)
            bias.set_value((value / jnp.asarray(divisor).reshape(value.shape))
                           .astype(value.dtype))
        return
    for variable in _norm_vectors(module):
        value = variable[...]
        variable.set_value((value / s.reshape(value.shape)).astype(value.dtype))


def scale_rows(block, local: str, contraction, s) -> None:
    """Multiplies the input rows (K) of the float layer at `local` by s."""
    module = module_at(block, local)
    kernel = module.kernel[...]
    matrix = contraction.matrix(kernel.astype(jnp.float32)) * s[:, None]
    module.kernel.set_value(contraction.kernel_from_matrix(matrix).astype(kernel.dtype))


def _relative(a, b) -> float:
    import jax

    a_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    b_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a_leaves, b_leaves))
    den = sum(float(np.sum(x ** 2)) for x in a_leaves)
    return float(np.sqrt(num / max(den, 1e-30)))


def _fold(context, group: BlockGroup, s, out_scaled: dict) -> None:
    fold_inverse(context.block, group.fold, s)
    if isinstance(getattr(module_at(context.block, group.fold), "kernel", None), nnx.Variable):
        out_scaled[group.fold] = s
    for member in group.members:
        scale_rows(context.block, member, context.targets[member].contraction, s)


def _snapshot(block) -> list:
    return [(v, v.get_value()) for _, v in nnx.iter_graph(block) if isinstance(v, nnx.Variable)]


def apply_folds(context, groups: list[BlockGroup], scales: dict[int, Any]) -> dict[str, Any]:
    """Folds each folded group's 1/s into its fold target and multiplies its members' rows by s
    (float weights, before quantization), then checks the block still computes its function on
    the first calibration batch (relative change < FOLD_TOLERANCE): declared folds all at once
    (else ValueError naming the fold targets and members), then each derived fold alone (else
    it is undone and the group keeps its scale in its layers: group.fold becomes None).
    scales: {group index: s}. Returns {local path of each fold target that is a layer: s} (its
    output columns were divided by s)."""
    folded = [i for i, g in enumerate(groups) if g.fold is not None and i in scales]
    if not folded:
        return {}
    reference = context.output()
    out_scaled: dict[str, Any] = {}
    declared = [i for i in folded if not groups[i].derived]
    for i in declared:
        _fold(context, groups[i], scales[i], out_scaled)
    change = _relative(reference, context.output()) if declared else 0.0
    if change > FOLD_TOLERANCE:
        folded = declared
        described = [(_full(context.path, groups[i].fold),
                      [_full(context.path, m) for m in groups[i].members]) for i in folded]
        raise ValueError(f"folding the scales into {described} (fold target, members) changes "
                         f"the block's output by {change:.2e} relative (> {FOLD_TOLERANCE}): a "
                         "fold target's output must feed exactly the group's layers, channel for "
                         "channel; fix the declared scale groups (or declare fold=None)")
    for i in folded:
        if not groups[i].derived:
            continue
        saved, kept = _snapshot(context.block), dict(out_scaled)
        _fold(context, groups[i], scales[i], out_scaled)
        if _relative(reference, context.output()) > FOLD_TOLERANCE:
            for variable, value in saved:
                variable.set_value(value)
            out_scaled = kept
            groups[i].fold = None
    return out_scaled
