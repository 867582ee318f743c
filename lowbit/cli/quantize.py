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
from lowbit.data.corpus import CORPORA, calibration_tokens
from lowbit.nn.gguf_layers import quantize_embeddings
from lowbit.ptq.methods import ROTATABLE_METHODS, get_method, run_method

METHODS = ("rtn", "gptq", "awq", "smoothquant", "llm_int8")  # the registry's weight methods
DEFAULT_WEIGHTS = {name: get_method(name).default_weights for name in METHODS}
DEFAULT_ACT = "int8:tensor:static"
DEFAULT_SMOOTHQUANT_ALPHA = 0.85
EMBED_CHOICES = ("f32", "q8_0")  # --embed: the float table, or lowbit.nn.quantize_embeddings' Q8_0 blocks

HELP = "post-training quantization into a checkpoint directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `lowbit quantize`."""
    parser.add_argument("--model", required=True,
                        help="a registered model name (smollm2-135m) or a llama GGUF file")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--weights", default=None,
                        help="weight spec, e.g. int4:g64:asym (default: int4:g64:asym; "
                             "int8:channel for smoothquant and llm_int8)")
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
    parser.add_argument("--rotate", action="store_true",
                        help="rtn, gptq, awq: rotate the model first (lowbit.ptq.rotation: norm "
                             "gains folded, randomized Hadamard residual and value-head "
                             "rotations, an online Hadamard before each down projection; the "
                             "head is untied), then quantize through lowbit.ptq.quantize")
    parser.add_argument("--calib", default="pydoc",
                        help="calibration text: 'pydoc' (the stdlib topics) or a UTF-8 file")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="calibration window offsets")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="calibration sequences per compiled call")
    parser.add_argument("--embed", default="f32", choices=EMBED_CHOICES,
                        help="how the token embedding (and so the tied output head) is stored: f32 "
                             "(default, as every earlier checkpoint and table was made) or q8_0 "
                             "(GGUF Q8_0 blocks, lowbit.nn.quantize_embeddings: 8.5 bits per weight, "
                             "the head runs the native GEMV; not counted in bits_per_weight, which "
                             "is the linears')")
    parser.add_argument("--out", required=True, help="new directory for the checkpoint")


def _check_method_options(args) -> None:
    method = args.method
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


def _check_early_arguments(args, out: Path) -> str:
    """The checks that need no model, run before it loads (seconds) and before quantization
    (minutes): --weights (returned, the method's default when not given), --out and --calib."""
    weights = DEFAULT_WEIGHTS[args.method] if args.weights is None else args.weights
    if getattr(args, "embed", "f32") not in EMBED_CHOICES:
        raise ValueError(f"--embed must be one of {EMBED_CHOICES}, got {args.embed!r}")
    if not weights.strip():
        raise ValueError(f"--weights must be a quantization spec such as "
                         f"{DEFAULT_WEIGHTS[args.method]!r} (or left out), got {weights!r}")
    try:
        QuantSpec.parse(weights)
    except ValueError as error:
        raise ValueError(f"--weights: {error}") from None
    _check_out(out)
    if args.method in ("gptq", "awq", "smoothquant"):
        for name, value in (("--calib-samples", args.calib_samples), ("--calib-len", args.calib_len)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if args.calib not in CORPORA and not Path(args.calib).expanduser().is_file():
            raise FileNotFoundError(f"--calib file not found: {args.calib} (or use one of {CORPORA})")
    return weights


def quantize_model(model, method: str, weights: str, calibration: np.ndarray | None, *,
                   act: str | None = None, alpha: float | None = None, smoothing: bool = True,
                   smooth_down: bool = False, threshold: float | None = 6.0,
                   act_order: bool = False,
                   static_groups: bool = False, batch_size: int = 8, progress: bool = True):
    """Runs one method on a model in place (through lowbit.ptq.methods) and returns its
    PTQResult; the CLI flags become the method's options."""
    from lowbit.ptq.awq import AWQ_GRID

    options: dict[str, Any] = {}
    if method in ("gptq", "awq", "smoothquant"):
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
                        static_groups: bool = False, batch_size: int = 8, progress: bool = True):
    """`--rotate`: lowbit.ptq.quantize(..., rotate=True) on every block linear of the Llama with
    one weight spec (rtn, gptq or awq; calibration [samples, len] in batches of batch_size)."""
    from lowbit.nn import QuantRule
    from lowbit.ptq.awq import AWQ_GRID
    from lowbit.ptq.driver import LLAMA_BLOCK_LINEARS
    from lowbit.ptq.methods import quantize

    options: dict[str, Any] = {}
    if method == "gptq":
        options.update(act_order=act_order, static_groups=static_groups)
    elif method == "awq":
        options["grid"] = AWQ_GRID if alpha is None else (alpha,)
    batches = None if calibration is None else [calibration[i:i + batch_size]
                                                for i in range(0, len(calibration), batch_size)]
    rule = QuantRule(path=LLAMA_BLOCK_LINEARS, weight_spec=weights)
    with warnings.catch_warnings():  # the untied float head matches no rule, by design
        warnings.filterwarnings("ignore", message=".*match no rule and stay float.*")
        return quantize(model, rule, method, batches, rotate=True, progress=progress, **options)


def run(args) -> None:
    """Quantizes --model with --method, writes the checkpoint to --out and prints a summary."""
    info = quantize_to_checkpoint(args)
    columns = ["method", "weights", "bits_per_weight", "mean_layer_rel_error", "quantize_seconds", "out"]
    emit(args, info, [info], columns)


def quantize_to_checkpoint(args) -> dict[str, Any]:
    """Quantizes --model with --method and writes the checkpoint to --out; returns a summary
    (method, specs, bits per weight of the linear weights, time, mean per-layer errors)."""
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model, sha256_of
    from lowbit.models.tokenizer import Tokenizer

    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {args.method!r}")
    _check_method_options(args)
    out = Path(args.out).expanduser()
    weights = _check_early_arguments(args, out)
    progress = show_progress(args)
    start = time.perf_counter()
    path = resolve_model(args.model)
    model, _ = load_gguf_model(path)
    calibration = None
    if args.method in ("gptq", "awq", "smoothquant"):
        tokenizer = Tokenizer.from_gguf(path)
        calibration = calibration_tokens(tokenizer, args.calib, args.calib_samples,
                                         args.calib_len, args.seed)
    threshold = None if args.threshold == float("inf") else args.threshold
    if getattr(args, "rotate", False):
        result = rotate_and_quantize(model, args.method, weights, calibration, alpha=args.alpha,
                                     act_order=args.act_order, static_groups=args.static_groups,
                                     batch_size=args.batch_size, progress=progress)
    else:
        result = quantize_model(model, args.method, weights, calibration, act=args.act,
                                alpha=args.alpha, smoothing=not args.no_smoothing,
                                smooth_down=args.smooth_down, threshold=threshold,
                                act_order=args.act_order, static_groups=args.static_groups,
                                batch_size=args.batch_size, progress=progress)
    source = {"model": str(args.model), "path": str(Path(path).resolve()),
              "sha256": sha256_of(path)}
    if calibration is not None:
        result.settings["calibration"] = {"source": str(args.calib), "seed": args.seed}
    report = result.report()
    embed = getattr(args, "embed", "f32")
    embedding_bytes = (quantize_embeddings(model, "Q8_0") if embed == "q8_0" else
                       {path: int(variable.get_value().nbytes) for path, variable in
                        float_variables(model).items() if path.endswith("embedding")})
    save(model, out, info={"method": result.method, "settings": report["settings"],
                           "source": source, "report": report, "embed": embed})
    errors = [layer.get("output_rel_error", layer.get("weight_rel_error"))
              for layer in report["layers"].values()]
    return {
        "method": args.method,
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
