"""Named quantization recipes for the built-in Llama: each a fixed sequence of the PTQ registry's
methods and options (rotation, a block-wise quantizer, end-to-end scale distillation), so that
one name rebuilds one point of the bits-per-weight / perplexity table.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.core.packing import pack, storage_bits
from lowbit.core.quantize import QArray
from lowbit.core.spec import QuantSpec
from lowbit.ptq.result import PTQResult

TERNARY_STORAGE = "base3"  # 5 ternary codes per byte: 1.6 bits per weight before the scales


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe: quantize every block linear of a Llama with `method` at `weights` (after a
    rotation if `rotate`; `options` are the method's), calibrated on calib_samples x calib_len
    tokens of the calibration text, then train the scales end to end against the source model
    for e2e_steps Adam steps (lowbit.ptq.e2e; 0: no such stage) on e2e_samples x e2e_len tokens
    (the KL that decides whether the trained scales are kept: on the first e2e_kl_batches).
    ternary: the grid of `weights` has three levels (symmetric int2) and is stored as ternary
    codes in base 3. calib: the calibration source `lowbit quantize` uses when --calib is not
    given (pydoc windows alternating with the model's own samples)."""

    name: str
    summary: str
    method: str
    weights: str
    rotate: bool
    options: tuple[tuple[str, Any], ...] = ()
    calib_samples: int = 64
    calib_len: int = 512
    e2e_steps: int = 128
    e2e_learning_rate: float = 1e-3
    e2e_batch_size: int = 2
    e2e_samples: int = 256
    e2e_kl_batches: int = 2
    e2e_len: int = 256
    ternary: bool = False
    calib: str = "pydoc+generated"

    def describe(self) -> str:
        """One line: what the recipe runs."""
        options = dict(self.options)
        method = (f"blockap {self.weights} ({options.get('steps')} steps a block from "
                  f"{options.get('init', 'rtn')}'s grid)" if self.method == "blockap"
                  else f"{self.method} {self.weights}")
        parts = ["rotate" if self.rotate else None,
                 method + (" as base-3 ternary" if self.ternary else ""),
                 f"E2E scales {self.e2e_steps} steps (KL to the source)" if self.e2e_steps else None]
        return " + ".join(p for p in parts if p)

    def bits_per_weight(self) -> float:
        """Bits per weight of codes, scales and offsets as stored (lowbit.core.packing.storage_bits)
        for a reduction length of 5 groups (a whole number of groups and of base-3 bytes)."""
        spec = QuantSpec.parse(self.weights)
        if self.ternary:
            spec = dataclasses.replace(spec, kind="ternary")
        length = 5 * spec.group_size
        return storage_bits(spec, (length, 1), ternary=TERNARY_STORAGE) / length


# The Block-AP recipes' options: 48 AdamW steps a block (6 passes over the 8 calibration batches of
# 8 x 512 tokens) from GPTQ's grid, rates 1e-3 (on SmolLM2's first blocks 2x lower block error than
# 1e-4 after 32 steps).
BLOCK_AP = (("steps", 48), ("init", "gptq"), ("weight_lr", 1e-3), ("scale_lr", 1e-3))

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("w4", "4.25 bits: rotated GPTQ int4:g64, then E2E scale distillation", "gptq",
           "int4:g64", True),
    Recipe("w3", "3.25 bits: rotated GPTQ int3:g64, then E2E scale distillation", "gptq",
           "int3:g64", True),
    Recipe("w2", "2.25 bits: rotated GPTQ int2:g128:asym (4 levels), then E2E scale "
           "distillation", "gptq", "int2:g128:asym", True),
    Recipe("ternary", "1.85 bits: rotated GPTQ with a 3-level grid (int2:g64), stored as "
           "base-3 ternary codes, then E2E scale distillation", "gptq", "int2:g64", True,
           ternary=True),
    # Block-AP trains each block's weights and scales from GPTQ's grid (papers/efficientqat): the
    # ternary one is better than "ternary" on the calibration domain and worse off it.
    Recipe("w2-blockap", "2.25 bits: rotated Block-AP int2:g128:asym (4 levels) from GPTQ's codes, "
           "then E2E scale distillation", "blockap", "int2:g128:asym", True, options=BLOCK_AP),
    Recipe("ternary-blockap", "1.85 bits: rotated Block-AP with a 3-level grid (int2:g64) from "
           "GPTQ's codes, stored as base-3 ternary codes, then E2E scale distillation", "blockap",
           "int2:g64", True, options=BLOCK_AP, ternary=True),
)}
RECIPE_NAMES = tuple(RECIPES)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {list(RECIPE_NAMES)}, got {name!r}")
    return RECIPES[name]


def recipe_help() -> str:
    """The recipes in one paragraph, for `lowbit quantize --help`."""
    return "; ".join(f"{r.name}: {r.describe()} ({r.bits_per_weight():.3g} bits per weight)"
                     for r in RECIPES.values())


def store_as_ternary(model, paths) -> None:
    """Re-packs each packed layer at `paths`, whose codes must be in {-1, 0, 1} (a symmetric
    int2 grid), as ternary codes in base 3 with the same scales: the same weights, 1.6 bits per
    code instead of 2."""
    from lowbit.nn.packed_layer import PackedLayer
    from lowbit.ptq.targets import module_at, replace_module

    for path in paths:
        layer = module_at(model, path)
        if not isinstance(layer, PackedLayer):
            raise ValueError(f"{path!r} is a {type(layer).__name__}, not a packed layer")
        q = layer.weight_qarray()
        spec = q.spec
        if spec.kind != "int" or spec.bits != 2 or not spec.symmetric or spec.super_block \
                or layer.act_spec is not None or layer.bias is not None:
            raise ValueError(f"{path!r}: only a symmetric int2 layer without input quantizer or "
                             f"bias stores as ternary, got spec {str(spec)!r}")
        ternary = dataclasses.replace(spec, kind="ternary")
        codes = QArray(q.codes, q.scale, None, ternary, 0)
        input_scale = None if layer.input_scale is None else layer.input_scale.get_value()
        replace_module(model, path, PackedLayer(
            layer.contraction, pack(codes, TERNARY_STORAGE), dtype=layer.dtype,
            runtime=layer.runtime, impl=layer.impl, input_scale=input_scale,
            input_transform=layer.input_transform))


def _refresh(model, result: PTQResult) -> None:
    """The result's weights and exact storage as the model's packed layers now hold them (after
    a base-3 re-pack or trained scales)."""
    from lowbit.ptq.targets import module_at

    bits = count = 0
    for path, entry in result.linears.items():
        layer = module_at(model, path)
        entry.weight = layer.weight_qarray()
        bits += 8 * layer.nbytes
        count += layer.in_features * layer.out_features
    result.storage = (bits, count)


def run_recipe(model, recipe: Recipe | str, calibration, *, teacher=None, e2e_calibration=None,
               workdir=None, progress: bool = True) -> tuple[PTQResult, dict[str, Any] | None]:
    """Runs a recipe on a built-in float Llama in place; returns (the block-wise quantizer's
    PTQResult with the recipe's settings, the E2E report or None).

    calibration: int tokens [calib_samples, calib_len] for the block-wise stage (batches of 8);
    teacher and e2e_calibration (int tokens [e2e_samples, e2e_len]): the E2E stage's source
    model and tokens, required when the recipe has one. workdir: the E2E training state and, for a
    Block-AP recipe, its finished blocks under workdir/block-ap (a rerun resumes from both).
    """
    from lowbit.nn import QuantRule
    from lowbit.ptq.driver import LLAMA_BLOCK_LINEARS
    from lowbit.ptq.e2e import e2e_train
    from lowbit.ptq.methods import quantize

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.e2e_steps and (teacher is None or e2e_calibration is None):
        raise ValueError(f"recipe {recipe.name!r} trains scales end to end: give teacher= (the "
                         "source model) and e2e_calibration= tokens")
    start = time.perf_counter()
    tokens = np.asarray(calibration)
    batches = [tokens[i:i + 8] for i in range(0, len(tokens), 8)]
    rule = QuantRule(path=LLAMA_BLOCK_LINEARS, weight_spec=recipe.weights)
    options = dict(recipe.options)
    if recipe.method == "blockap" and workdir is not None:  # finished blocks survive an interruption
        options["workdir"] = str(Path(workdir) / "block-ap")
    with warnings.catch_warnings():  # a rotated model's untied head matches no rule, by design
        warnings.filterwarnings("ignore", message=".*match no rule and stay float.*")
        result = quantize(model, rule, recipe.method, batches, rotate=recipe.rotate,
                          progress=progress, **options)
    if recipe.ternary:
        store_as_ternary(model, list(result.linears))
    report = None
    if recipe.e2e_steps:
        report = e2e_train(model, teacher, e2e_calibration, steps=recipe.e2e_steps,
                           learning_rate=recipe.e2e_learning_rate,
                           batch_size=recipe.e2e_batch_size, kl_batches=recipe.e2e_kl_batches,
                           workdir=workdir, checkpoint_every=2, progress=progress)
    _refresh(model, result)
    result.method = f"recipe:{recipe.name}"
    result.settings = {**result.settings, "recipe": dataclasses.asdict(recipe)}
    result.seconds = time.perf_counter() - start
    return result, report
