"""Runs: one run description {"method", "weights", "options", optional "label"} applied to a
fresh copy of a model through the PTQ method registry and scored against the original through
the one scorer (lowbit.eval); a table of runs for the demo and the paper sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from lowbit.data.corpus import calibration_tokens, evaluation_tokens
from lowbit.eval.perplexity import ReferenceScorer
from lowbit.ptq.methods import get_method, run_method
from lowbit.sweep.config import DATA_DEFAULTS


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
                  calib_samples: int = DATA_DEFAULTS["calib_samples"], calib_len: int = DATA_DEFAULTS["calib_len"],
                  eval_windows: int = DATA_DEFAULTS["eval_windows"], ctx: int = DATA_DEFAULTS["ctx"],
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
