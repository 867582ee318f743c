"""`lowbit quantize`: quantize a GGUF model with one method of the PTQ registry and write a packed
checkpoint directory."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.checkpoint import float_variables, save
from lowbit.cli.output import emit, show_progress
from lowbit.core.spec import QuantSpec
from lowbit.data.corpus import GENERATED, calibration_shares, calibration_windows
from lowbit.decode.calibration import TEMPERATURE, generated_windows
from lowbit.ptq.block_ap import INITS, LEARN_MODES
from lowbit.ptq.embeddings import quantize_embeddings
from lowbit.ptq.methods import ROTATABLE_METHODS, get_method, run_method
from lowbit.ptq.mixed import BASES, DEFAULT_CANDIDATES
from lowbit.ptq.recipes import RECIPE_NAMES, get_recipe, recipe_help

METHODS = ("rtn", "gptq", "awq", "blockap", "mixed", "smoothquant", "llm_int8")
CALIBRATED = ("gptq", "awq", "blockap", "mixed", "smoothquant")
DEFAULT_WEIGHTS = {name: get_method(name).default_weights for name in METHODS}
BLOCK_AP_DEFAULTS = {name: get_method("blockap").options()[name]
                     for name in ("steps", "learn", "init", "weight_lr", "scale_lr")}
DEFAULT_ACT = "int8:tensor:static"
DEFAULT_SMOOTHQUANT_ALPHA = 0.85
EMBED_CHOICES = ("f32", "q8_0")  # --embed: the float table, or lowbit.ptq.quantize_embeddings' Q8_0 blocks

HELP = "post-training quantization into a checkpoint directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lowbit quantize`."""
    parser.add_argument("--model", required=True,
                        help="a registered model name (smollm2-135m) or a llama GGUF file")
    parser.add_argument("--method", default=None, choices=METHODS,
                        help="a PTQ method of the registry (lowbit.ptq.methods); or --recipe")
    parser.add_argument("--recipe", default=None, choices=RECIPE_NAMES,
                        help="a named recipe (lowbit.ptq.recipes), a fixed sequence of methods "
                             "and options; its --weights, method options and calibration are "
                             "its own. " + recipe_help())
    parser.add_argument("--weights", default=None,
                        help="weight spec, e.g. int4:g64:asym (default: int4:g64:asym; "
                             "int8:channel for smoothquant and llm_int8; mixed takes "
                             "--candidates instead)")
    parser.add_argument("--act", default=None,
                        help="smoothquant activations: int8:token (O1), int8:tensor (O2) or "
                             f"int8:tensor:static (O3, default)")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"smoothquant migration strength (default "
                             f"{DEFAULT_SMOOTHQUANT_ALPHA}); awq: use this alpha instead of "
                             "the grid search")
    parser.add_argument("--no-smoothing", action="store_true",
                        help="smoothquant: skip smoothing (the naive W8A8 baseline)")
    parser.add_argument("--smooth-down", action="store_true",
                        help="smoothquant: also smooth the down projection's input (through "
                             "w_up's output columns; not in the reference recipe)")
    parser.add_argument("--threshold", type=float, default=6.0,
                        help="llm_int8 outlier threshold on |x| (default 6.0; inf: no "
                             "outlier path)")
    parser.add_argument("--act-order", action="store_true",
                        help="gptq: quantize inputs by descending Hessian diagonal")
    parser.add_argument("--static-groups", action="store_true",
                        help="gptq: compute every group's scale from the original weights")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"blockap: AdamW steps per block (default "
                             f"{BLOCK_AP_DEFAULTS['steps']})")
    parser.add_argument("--learn", default=None, choices=LEARN_MODES,
                        help=f"blockap: what each block trains (default "
                             f"{BLOCK_AP_DEFAULTS['learn']}; clip: OmniQuant's LWC)")
    parser.add_argument("--init", default=None, choices=INITS,
                        help=f"blockap: the starting grid (default {BLOCK_AP_DEFAULTS['init']})")
    parser.add_argument("--weight-lr", type=float, default=None,
                        help=f"blockap: weights' learning rate (default "
                             f"{BLOCK_AP_DEFAULTS['weight_lr']})")
    parser.add_argument("--scale-lr", type=float, default=None,
                        help=f"blockap: scales' (clip factors') learning rate (default "
                             f"{BLOCK_AP_DEFAULTS['scale_lr']})")
    parser.add_argument("--workdir", default=None,
                        help="blockap / --recipe: a folder keeping finished blocks and training "
                             "checkpoints; rerunning the same command resumes from it")
    parser.add_argument("--budget", type=float, default=None,
                        help="mixed: bits per weight the allocation may spend (required)")
    parser.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                        help="mixed: comma-separated candidate specs (default "
                             f"{','.join(DEFAULT_CANDIDATES)})")
    parser.add_argument("--base", default="rtn", choices=BASES,
                        help="mixed: what quantizes each candidate: rtn per linear, or one "
                             "gptq run per candidate (default rtn)")
    parser.add_argument("--rotate", action="store_true",
                        help="rtn, gptq, awq, blockap, mixed: rotate the model first (lowbit.ptq.rotation: norm "
                             "gains folded, randomized Hadamard residual and value-head "
                             "rotations, an online Hadamard before each down projection; the "
                             "head is untied), then quantize through lowbit.ptq.quantize")
    parser.add_argument("--calib", default=None,
                        help="calibration source (default: pydoc; a --recipe's own, "
                             "pydoc+generated): 'pydoc' (the calibration half of the stdlib "
                             "topics), a UTF-8 file, 'generated' (sequences the model samples "
                             "itself before quantization: a BOS token, then temperature 1, seed "
                             "--seed; LLM-QAT's data-free calibration) or a mixture joined by '+' "
                             "(e.g. pydoc+generated: the samples split equally, the first sources "
                             "taking the remainder, windows alternating). 'licenses' is refused: "
                             "it is the held-apart out-of-domain evaluation text")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0,
                        help="calibration window offsets and the generated windows' sampling")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="calibration sequences per compiled call")
    parser.add_argument("--embed", default="f32", choices=EMBED_CHOICES,
                        help="how the token embedding (and so the tied output head) is stored: f32 "
                             "(default, as every earlier checkpoint and table was made) or q8_0 "
                             "(GGUF Q8_0 blocks, lowbit.ptq.quantize_embeddings: 8.5 bits per weight, "
                             "the head runs the native GEMV; not counted in bits_per_weight, which "
                             "is the linears')")
    parser.add_argument("--out", required=True, help="new directory for the checkpoint")


def _check_method_options(args) -> None:
    method = args.method
    if (method is None) == (getattr(args, "recipe", None) is None):
        raise ValueError("give one of --method (a PTQ method) or --recipe (a named recipe)")
    if method is None:
        _check_recipe_options(args)
        return
    if args.act is not None and method != "smoothquant":
        raise ValueError("--act only applies to --method smoothquant")
    if args.alpha is not None and method not in ("smoothquant", "awq"):
        raise ValueError("--alpha only applies to --method smoothquant or awq")
    if args.no_smoothing and method != "smoothquant":
        raise ValueError("--no-smoothing only applies to --method smoothquant")
    if args.smooth_down and (method != "smoothquant" or args.no_smoothing):
        raise ValueError("--smooth-down only applies to --method smoothquant with smoothing")
    if args.no_smoothing and args.alpha is not None:
        raise ValueError("--no-smoothing and --alpha exclude each other")
    if (args.act_order or args.static_groups) and method != "gptq":
        raise ValueError("--act-order and --static-groups only apply to --method gptq")
    if getattr(args, "rotate", False) and method not in ROTATABLE_METHODS:
        raise ValueError(f"--rotate applies to --method {' / '.join(ROTATABLE_METHODS)}, "
                         f"got {method!r}")
    given = [flag for flag, name in _BLOCK_AP_FLAGS.items() if getattr(args, name) is not None]
    if given and method != "blockap":
        raise ValueError(f"{' '.join(given)} only apply to --method blockap")
    if getattr(args, "workdir", None) is not None and method != "blockap":
        raise ValueError("--workdir only applies to --method blockap or a --recipe")
    if method == "mixed":
        if args.budget is None:
            raise ValueError("--method mixed needs --budget (bits per weight)")
        if args.weights is not None:
            raise ValueError("--method mixed takes --candidates, not --weights")
    elif args.budget is not None or args.base != "rtn" or \
            args.candidates != ",".join(DEFAULT_CANDIDATES):
        raise ValueError("--budget, --candidates and --base only apply to --method mixed")


_BLOCK_AP_FLAGS = {"--steps": "steps", "--learn": "learn", "--init": "init",
                   "--weight-lr": "weight_lr", "--scale-lr": "scale_lr"}
# Options a recipe fixes itself (flag -> (argument name, its default)).
_RECIPE_FIXED = {"--weights": ("weights", None), "--act": ("act", None), "--alpha": ("alpha", None),
                 "--no-smoothing": ("no_smoothing", False), "--smooth-down": ("smooth_down", False),
                 "--act-order": ("act_order", False), "--static-groups": ("static_groups", False),
                 "--rotate": ("rotate", False), "--budget": ("budget", None),
                 "--calib-samples": ("calib_samples", 128), "--calib-len": ("calib_len", 512),
                 "--batch-size": ("batch_size", 8), "--threshold": ("threshold", 6.0),
                 "--base": ("base", "rtn"), "--candidates": ("candidates", ",".join(DEFAULT_CANDIDATES)),
                 **{flag: (name, None) for flag, name in _BLOCK_AP_FLAGS.items()}}


def _check_recipe_options(args) -> None:
    fixed = [flag for flag, (name, default) in _RECIPE_FIXED.items()
             if getattr(args, name, default) != default]
    if fixed:
        raise ValueError(f"--recipe {args.recipe} fixes its own method options; drop "
                         f"{' '.join(fixed)}")


def _check_out(out: Path) -> None:
    """--out must be a new path whose nearest existing ancestor is a directory we can write."""
    if out.exists():
        raise ValueError(f"--out {out} already exists; choose a new directory")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {out}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {ancestor} (permission denied)")


def _check_early_arguments(args, out: Path) -> str | None:
    """The checks that need no model, run before it loads (seconds) and before quantization
    (minutes): --weights (returned, the method's default when not given; None for mixed and
    recipes, whose specs are their own), --out and --calib."""
    calibrated = args.recipe is not None or args.method in CALIBRATED
    if getattr(args, "embed", "f32") not in EMBED_CHOICES:
        raise ValueError(f"--embed must be one of {EMBED_CHOICES}, got {args.embed!r}")
    weights = None
    if args.method is not None and args.method != "mixed":
        weights = DEFAULT_WEIGHTS[args.method] if args.weights is None else args.weights
        if not weights.strip():
            raise ValueError(f"--weights must be a quantization spec such as "
                             f"{DEFAULT_WEIGHTS[args.method]!r} (or left out), got {weights!r}")
        try:
            QuantSpec.parse(weights)
        except ValueError as error:
            raise ValueError(f"--weights: {error}") from None
    if args.method == "mixed":
        if not args.budget > 0:
            raise ValueError(f"--budget must be a positive number of bits per weight, got "
                             f"{args.budget}")
        for spec in _candidates(args):
            try:
                QuantSpec.parse(spec)
            except ValueError as error:
                raise ValueError(f"--candidates: {error}") from None
    _check_out(out)
    if calibrated:
        for name, value in (("--calib-samples", args.calib_samples), ("--calib-len", args.calib_len)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if args.recipe is None:
            counts = [args.calib_samples]
        else:
            recipe = get_recipe(args.recipe)
            counts = [recipe.calib_samples] + ([recipe.e2e_samples] if recipe.e2e_steps else [])
        try:
            for samples in counts:
                calibration_shares(calibration_source(args), samples)
        except ValueError as error:
            raise ValueError(f"--calib: {error}") from None
    return weights


def _candidates(args) -> list[str]:
    specs = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not specs:
        raise ValueError(f"--candidates must list weight specs separated by commas, got "
                         f"{args.candidates!r}")
    return specs


def calibration_source(args) -> str:
    """--calib as given, else a recipe's own calibration source, else pydoc."""
    if getattr(args, "calib", None) is not None:
        return args.calib
    return get_recipe(args.recipe).calib if getattr(args, "recipe", None) else "pydoc"


def method_options(args) -> dict[str, Any]:
    """The registry options that --method blockap / mixed flags set (unset flags: defaults)."""
    if args.method == "blockap":
        options = {name: getattr(args, name) for name in _BLOCK_AP_FLAGS.values()
                   if getattr(args, name) is not None}
        if args.workdir is not None:
            options["workdir"] = str(Path(args.workdir).expanduser())
        return options
    if args.method == "mixed":
        return {"budget": args.budget, "candidates": tuple(_candidates(args)), "base": args.base}
    return {}


def quantize_model(model, method: str, weights: str, calibration: np.ndarray | None, *,
                   act: str | None = None, alpha: float | None = None, smoothing: bool = True,
                   smooth_down: bool = False, threshold: float | None = 6.0,
                   act_order: bool = False,
                   static_groups: bool = False, batch_size: int = 8, progress: bool = True,
                   options: dict[str, Any] | None = None):
    """Runs one method on a model in place (through lowbit.ptq.methods) and returns its
    PTQResult; the CLI flags become the method's options (`options`: blockap's and mixed's,
    see method_options)."""
    from lowbit.ptq.awq import AWQ_GRID

    options = dict(options or {})
    if method in CALIBRATED:
        options.update(batch_size=batch_size, progress=progress)
    if method == "gptq":
        options.update(act_order=act_order, static_groups=static_groups)
    elif method == "awq":
        options["grid"] = AWQ_GRID if alpha is None else (alpha,)
    elif method == "smoothquant":
        if smoothing:
            alpha = DEFAULT_SMOOTHQUANT_ALPHA if alpha is None else alpha
        else:
            alpha = None
        options.update(act=act or DEFAULT_ACT, alpha=alpha, smooth_down=smooth_down)
    elif method == "llm_int8":
        options["threshold"] = threshold
    return run_method(method, model, weights, calibration, **options)


def rotate_and_quantize(model, method: str, weights: str, calibration: np.ndarray | None, *,
                        alpha: float | None = None, act_order: bool = False,
                        static_groups: bool = False, batch_size: int = 8, progress: bool = True,
                        options: dict[str, Any] | None = None):
    """`--rotate`: lowbit.ptq.quantize(..., rotate=True) on every block linear of the Llama with
    one weight spec (rtn, gptq, awq or blockap with `options`; mixed: its allocation over the
    candidates of `options`); calibration [samples, len] in batches of batch_size."""
    from lowbit.nn import QuantRule
    from lowbit.ptq.awq import AWQ_GRID
    from lowbit.ptq.driver import LLAMA_BLOCK_LINEARS
    from lowbit.ptq.methods import quantize

    options = dict(options or {})
    if method == "gptq":
        options.update(act_order=act_order, static_groups=static_groups)
    elif method == "awq":
        options["grid"] = AWQ_GRID if alpha is None else (alpha,)
    elif method == "mixed":  # the rule only selects the linears; the allocation picks the specs
        weights = options.get("candidates", DEFAULT_CANDIDATES)[0]
    batches = None if calibration is None else [calibration[i:i + batch_size]
                                                for i in range(0, len(calibration), batch_size)]
    rule = QuantRule(path=LLAMA_BLOCK_LINEARS, weight_spec=weights)
    with warnings.catch_warnings():  # the untied float head matches no rule, by design
        warnings.filterwarnings("ignore", message=".*match no rule and stay float.*")
        return quantize(model, rule, method, batches, rotate=True, progress=progress, **options)


def calibration_set(model, tokenizer, spec: str, samples: int, length: int, seed: int,
                    progress: bool = False) -> np.ndarray:
    """[samples, length] calibration tokens of --calib SPEC (lowbit.data.corpus.calibration_windows);
    its 'generated' windows are sampled from `model` as it is now, before quantization
    (lowbit.decode.calibration.generated_windows from the tokenizer's BOS token)."""
    def generated(count: int, length: int, seed: int) -> np.ndarray:
        if tokenizer.bos_id is None:
            raise ValueError(f"--calib {GENERATED}: the model's tokenizer has no BOS token to "
                             "start the generated windows from")
        return generated_windows(model, count, length, start_id=tokenizer.bos_id, seed=seed,
                                 progress=progress)

    return calibration_windows(tokenizer, spec, samples, length, seed, generated=generated)


def calibration_settings(spec: str, samples: int, seed: int, tokenizer) -> dict[str, Any]:
    """What a checkpoint records of its calibration: the spec, the seed, the windows per source,
    and for generated windows their temperature and start token."""
    shares = calibration_shares(spec, samples)
    settings = {"source": str(spec), "seed": seed, "windows": shares}
    if GENERATED in shares:
        settings[GENERATED] = {"temperature": TEMPERATURE, "start_id": tokenizer.bos_id}
    return settings


def run(args) -> None:
    """Quantizes --model with --method or --recipe, writes the checkpoint to --out and prints a
    summary."""
    info = quantize_to_checkpoint(args)
    columns = ["method", "weights", "bits_per_weight", "mean_layer_rel_error", "quantize_seconds", "out"]
    emit(args, info, [info], columns)


def quantize_to_checkpoint(args) -> dict[str, Any]:
    """Quantizes --model with --method (or --recipe) and writes the checkpoint to --out; returns
    a summary (method, specs, bits per weight of the linear weights, time, mean per-layer
    errors; for a recipe its E2E report)."""
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model, sha256_of
    from lowbit.models.tokenizer import Tokenizer

    if args.method is not None and args.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {args.method!r}")
    _check_method_options(args)
    out = Path(args.out).expanduser()
    weights = _check_early_arguments(args, out)
    progress = show_progress(args)
    start = time.perf_counter()
    path = resolve_model(args.model)
    model, _ = load_gguf_model(path)
    calibration = None
    if args.recipe is not None or args.method in CALIBRATED:
        tokenizer = Tokenizer.from_gguf(path)
    e2e = None
    if args.recipe is not None:
        result, e2e = _run_recipe(args, model, path, tokenizer, progress)
        weights = result.settings["recipe"]["weights"]
    else:
        if args.method in CALIBRATED:
            calibration = calibration_set(model, tokenizer, calibration_source(args),
                                          args.calib_samples, args.calib_len, args.seed, progress)
        threshold = None if args.threshold == float("inf") else args.threshold
        options = method_options(args)
        if getattr(args, "rotate", False):
            result = rotate_and_quantize(model, args.method, weights, calibration,
                                         alpha=args.alpha, act_order=args.act_order,
                                         static_groups=args.static_groups,
                                         batch_size=args.batch_size, progress=progress,
                                         options=options)
        else:
            result = quantize_model(model, args.method, weights, calibration, act=args.act,
                                    alpha=args.alpha, smoothing=not args.no_smoothing,
                                    smooth_down=args.smooth_down, threshold=threshold,
                                    act_order=args.act_order, static_groups=args.static_groups,
                                    batch_size=args.batch_size, progress=progress,
                                    options=options)
        if calibration is not None:
            result.settings["calibration"] = calibration_settings(
                calibration_source(args), args.calib_samples, args.seed, tokenizer)
    source = {"model": str(args.model), "path": str(Path(path).resolve()),
              "sha256": sha256_of(path)}
    report = result.report()
    embed = getattr(args, "embed", "f32")
    embedding_bytes = (quantize_embeddings(model, "Q8_0") if embed == "q8_0" else
                       {path: int(variable.get_value().nbytes) for path, variable in
                        float_variables(model).items() if path.endswith("embedding")})
    info = {"method": result.method, "settings": report["settings"], "source": source,
            "report": report, "embed": embed}
    if e2e is not None:
        info["e2e"] = e2e
    save(model, out, info=info)
    errors = [layer.get("output_rel_error", layer.get("weight_rel_error"))
              for layer in report["layers"].values()]
    summary = {
        "method": result.method,
        "model": str(args.model),
        "weights": weights,
        "settings": report["settings"],
        "bits_per_weight": round(report["bits_per_weight"], 4),
        "linear_weights": report["linear_weights"],
        "embed": embed,
        "embedding_bytes": sum(embedding_bytes.values()),
        "mean_layer_rel_error": float(np.mean(errors)),
        "quantize_seconds": round(result.seconds, 2),
        "total_seconds": round(time.perf_counter() - start, 2),
        "out": str(out),
    }
    if e2e is not None:
        summary["e2e"] = {key: e2e[key] for key in ("initial_kl", "final_kl", "kept_initial",
                                                   "steps", "resumed_at", "seconds")}
    return summary


def _run_recipe(args, model, path, tokenizer, progress: bool):
    """--recipe: its calibration (--calib, else the recipe's own; --seed) for the block-wise
    stage, other windows of the same sources (seed + 1) for the E2E stage against the source
    GGUF on its own blocks."""
    from lowbit.models.loader import load_gguf_model
    from lowbit.ptq.recipes import run_recipe

    recipe = get_recipe(args.recipe)
    source = calibration_source(args)
    calibration = calibration_set(model, tokenizer, source, recipe.calib_samples,
                                  recipe.calib_len, args.seed, progress)
    teacher = e2e_tokens = None
    if recipe.e2e_steps:
        teacher, _ = load_gguf_model(path, runtime="packed")
        e2e_tokens = calibration_set(model, tokenizer, source, recipe.e2e_samples,
                                     recipe.e2e_len, args.seed + 1, progress)
    result, e2e = run_recipe(model, recipe, calibration, teacher=teacher,
                             e2e_calibration=e2e_tokens, workdir=args.workdir, progress=progress)
    result.settings["calibration"] = {**calibration_settings(source, recipe.calib_samples,
                                                             args.seed, tokenizer),
                                      "e2e_seed": args.seed + 1}
    return result, e2e
