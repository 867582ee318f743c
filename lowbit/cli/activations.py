"""`lowbit activations`: per-layer statistics of every block linear's input (absmax, percentiles,
kurtosis, outlier features) on calibration text, as JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.cli.output import show_progress

HELP = ("per-layer statistics of every linear input (absmax, percentiles, kurtosis, outlier features), "
        "as JSON and a plot")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="registry name or GGUF path")
    parser.add_argument("--calib", default="pydoc", help="corpus name or text file")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--out", default="results/activations",
                        help="folder for activations.json and activations.png")


def run(args) -> None:
    report(args, measure(args))


def measure(args) -> dict[str, Any]:
    """Statistics on the calibration split, saved as JSON and a plot."""
    from lowbit.checkpoint import load_model_and_tokenizer
    from lowbit.data.corpus import calibration_tokens
    from lowbit.ptq.activations import activation_statistics, plot, save_json

    model, tokenizer = load_model_and_tokenizer(args.model, runtime="dequant")  # the float layers the driver hooks
    tokens = calibration_tokens(tokenizer, args.calib, args.calib_samples, args.calib_len)
    stats = activation_statistics(model, tokens, progress=show_progress(args))
    stats["source"] = {"model": str(args.model), "calibration": list(tokens.shape)}
    out = Path(args.out)
    save_json(stats, out / "activations.json")
    plot(stats, out / "activations.png")
    return stats


def report(args, stats: dict[str, Any]) -> None:
    """Prints the statistics: the per-layer table and the outlier dimensions (or JSON)."""
    from lowbit.ptq.activations import OUTLIER_THRESHOLD, summary_table

    if args.json:
        print(json.dumps(stats))
        return
    print(summary_table(stats))
    systematic = [d for d in stats["outlier_dimensions"] if d["systematic"]]
    print(f"\n{len(stats['outlier_dimensions'])} feature dimensions reach |x| >= "
          f"{OUTLIER_THRESHOLD} somewhere in the residual-stream inputs; systematic "
          f"(>= 25% of layers, >= 6% of tokens): {[d['feature'] for d in systematic]}")
    print(f"wrote {Path(args.out) / 'activations.json'} and {Path(args.out) / 'activations.png'}")
