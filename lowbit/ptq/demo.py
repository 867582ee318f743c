"""The PTQ demo: SmolLM2-135M quantized with RTN, GPTQ and AWQ at int4 g64 and int3 g64, each
scored on the pydoc evaluation split (bits per weight, perplexity, KL vs the original, time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from lowbit.data.corpus import calibration_tokens, evaluation_tokens
from lowbit.eval.perplexity import ReferenceScorer
from lowbit.ptq.methods import get_method, run_method

DEMO_SPECS = ("int4:g64:asym", "int3:g64:asym")
DEMO_METHODS = ("rtn", "gptq", "awq")
# Sized for about 10 minutes on a shared 2-core CPU (see the module's main()).
DEMO_CALIB_SAMPLES = 4
DEMO_CALIB_LEN = 512
DEMO_EVAL_WINDOWS = 4
DEMO_CTX = 512
DEMO_AWQ = {"search_sequences": 1, "search_tokens": 256, "clip_tokens": 128}
COLUMNS = ["method", "weights", "label", "bits_per_weight", "ppl", "kl", "top1", "quantize_s"]


def demo_runs(methods: Sequence[str] = DEMO_METHODS, specs: Sequence[str] = DEMO_SPECS,
              awq_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every method at every spec, spec-major, as run descriptions for run_ptq_table."""
    return [{"method": m, "weights": s, "options": dict(awq_options or {}) if m == "awq" else {}}
            for s in specs for m in methods]


def quantize_run(model, run: dict[str, Any], calibration, progress: bool = False,
                 source=None):
    """Applies one run description {"method", "weights", "options"} to a model in place.

    Method "llamacpp" (weights: a llama.cpp type such as "Q4_0") re-quantizes the model's
    `source` GGUF with llama.cpp in a temporary directory and loads its weights.
    """
    method, weights, options = run["method"], run["weights"], dict(run.get("options", {}))
    function_options = get_method(method).options()
    if "progress" in function_options:
        options["progress"] = progress
    if method == "llamacpp":
        options["source"] = source
    return run_method(method, model, weights, calibration, **options)


def run_ptq_table(runs: Sequence[dict[str, Any]], model: str = "smollm2-135m", *,
                  calib_samples: int = DEMO_CALIB_SAMPLES, calib_len: int = DEMO_CALIB_LEN,
                  eval_windows: int = DEMO_EVAL_WINDOWS, ctx: int = DEMO_CTX,
                  corpus: str = "pydoc", progress: bool = False,
                  on_row=None) -> list[dict[str, Any]]:
    """Applies each run ({"method", "weights", "options", optional "label"}) to a fresh copy of
    `model` and scores it against the original on the corpus's evaluation split. Returns one
    row per run, the original first: method, weights, label, bits_per_weight (linear weights),
    ppl, kl, top1, quantize_s. on_row(row) is called as each row is ready. All runs share the
    same calibration windows (from the calibration split).
    """
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model
    from lowbit.models.tokenizer import Tokenizer

    path = resolve_model(model)
    tokenizer = Tokenizer.from_gguf(path)
    original, _ = load_gguf_model(path)
    scorer = ReferenceScorer(original, evaluation_tokens(tokenizer, corpus), ctx, eval_windows,
                             progress)
    calibration = calibration_tokens(tokenizer, corpus, calib_samples, calib_len)
    rows = [{"method": "original", "weights": "gguf Q4_1", "label": "", "bits_per_weight": 5.0,
             "ppl": scorer.ref_ppl, "kl": 0.0, "top1": 1.0, "quantize_s": 0.0}]
    if on_row:
        on_row(rows[0])
    for run in runs:
        row = score_run(original, run, scorer, calibration, progress, source=path)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def score_run(original, run: dict[str, Any], scorer: ReferenceScorer, calibration,
              progress: bool = False, source=None) -> dict[str, Any]:
    """Quantizes a fresh copy of `original` with one run description and scores it against
    the reference: the row run_ptq_table reports (method, weights, label, bits_per_weight,
    ppl, kl, top1, quantize_s, and AWQ's mean alphas). `original` is left unchanged."""
    quantized = nnx.clone(original)  # shares the immutable arrays until they are replaced
    result = quantize_run(quantized, run, calibration, progress, source=source)
    row = {"method": run["method"], "weights": run["weights"],
           "label": run.get("label", ""),
           "bits_per_weight": round(result.bits_per_weight, 4),
           **{k: v for k, v in scorer.score(quantized, progress).items() if k != "ref_ppl"},
           "quantize_s": round(result.seconds, 1)}
    alphas = _mean_alphas(result.block_reports)
    if alphas:
        row["alphas"] = alphas
    return row


def _mean_alphas(block_reports: list[dict[str, Any]]) -> dict[str, float]:
    """AWQ's chosen alpha per scaled input, averaged over the blocks (empty for other methods)."""
    chosen: dict[str, list[float]] = {}
    for report in block_reports:
        for group, entry in report.items():
            if isinstance(entry, dict) and "alpha" in entry:
                chosen.setdefault(group, []).append(entry["alpha"])
    return {group: round(float(np.mean(values)), 3) for group, values in chosen.items()}


def format_table(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table of the rows."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """`python -m lowbit.ptq.demo`: the demo table (about 10 minutes on a shared 2-core CPU
    with the defaults: 4 x 512 calibration tokens, 4 evaluation windows of 512)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-samples", type=int, default=DEMO_CALIB_SAMPLES)
    parser.add_argument("--calib-len", type=int, default=DEMO_CALIB_LEN)
    parser.add_argument("--eval-windows", type=int, default=DEMO_EVAL_WINDOWS)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    progress = not args.quiet and sys.stderr.isatty()
    rows = run_ptq_table(demo_runs(awq_options=DEMO_AWQ), args.model,
                         calib_samples=args.calib_samples, calib_len=args.calib_len,
                         eval_windows=args.eval_windows, progress=progress)
    total = time.perf_counter() - start
    if args.json:
        print(json.dumps({"rows": rows, "total_seconds": round(total, 1)}))
    else:
        print(format_table(rows))
        print(f"\ncalibration {args.calib_samples} x {args.calib_len} pydoc tokens; evaluation "
              f"{args.eval_windows} windows of {DEMO_CTX} from the pydoc evaluation split; "
              f"total {total:.0f} s")
    return rows


if __name__ == "__main__":
    main()
