"""The PTQ demo: SmolLM2-135M quantized with RTN, GPTQ and AWQ at int4 g64 and int3 g64, each
scored on the pydoc evaluation split (bits per weight, perplexity, KL vs the original, time).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

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


@functools.partial(jax.jit, static_argnums=0)
def _reference_window(graphdef, state, tokens):
    logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)
    return log_probs.astype(jnp.float16), -picked.sum()


@functools.partial(jax.jit, static_argnums=0)
def _scored_window(graphdef, state, tokens, reference):
    logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ref = reference.astype(jnp.float32)
    ref = ref - jax.nn.logsumexp(ref, axis=-1, keepdims=True)  # renormalize after f16 storage
    kl = jnp.sum(jnp.exp(ref) * (ref - log_probs), axis=-1)[:, :-1].sum()
    picked = jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)
    agree = (jnp.argmax(log_probs, -1) == jnp.argmax(ref, -1))[:, :-1].sum()
    return kl, -picked.sum(), agree


class ReferenceScorer:
    """Perplexity, KL(reference || model) and top-1 agreement on fixed windows, with the
    reference's log-probabilities computed once and kept in f16 on the host
    (windows * ctx * vocab * 2 bytes: 0.2 GB for 4 windows of 512 over 49152 tokens).

    tokens: 1-D evaluation tokens; the first `windows` non-overlapping windows of ctx are used.
    """

    def __init__(self, reference_model, tokens, ctx: int = DEMO_CTX,
                 windows: int = DEMO_EVAL_WINDOWS, progress: bool = False):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size < ctx * windows or windows < 1 or ctx < 2:
            raise ValueError(f"need a 1-D token array of at least windows * ctx = "
                             f"{windows} * {ctx} tokens, got shape {tokens.shape}")
        self.windows = tokens[:windows * ctx].reshape(windows, ctx).astype(np.int32)
        self.scored = windows * (ctx - 1)
        graphdef, state = nnx.split(reference_model)
        self.reference = []
        total = 0.0
        for window in tqdm(self.windows, desc="reference", disable=not progress, leave=False):
            log_probs, nll = _reference_window(graphdef, state, jnp.asarray(window[None]))
            self.reference.append(np.asarray(log_probs))
            total += float(nll)
        self.ref_ppl = math.exp(total / self.scored)

    def score(self, model, progress: bool = False) -> dict[str, float]:
        """{"ppl", "kl", "top1", "ref_ppl"} of model on the windows."""
        graphdef, state = nnx.split(model)
        totals = np.zeros(3)
        for window, reference in tqdm(list(zip(self.windows, self.reference)), desc="score",
                                      disable=not progress, leave=False):
            parts = _scored_window(graphdef, state, jnp.asarray(window[None]),
                                   jnp.asarray(reference))
            totals += [float(p) for p in parts]
        kl, nll, agree = totals / self.scored
        return {"ppl": math.exp(nll), "kl": float(kl), "top1": float(agree),
                "ref_ppl": self.ref_ppl}


def evaluation_split(tokenizer, corpus: str = "pydoc") -> np.ndarray:
    """The evaluation half of a corpus (never used for calibration)."""
    from lowbit.data.corpus import load_text, split_tokens

    return split_tokens(np.asarray(tokenizer.encode(load_text(corpus)), np.int32))[1]


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
    from lowbit.ptq.cli import calibration_tokens

    path = resolve_model(model)
    tokenizer = Tokenizer.from_gguf(path)
    original, _ = load_gguf_model(path)
    scorer = ReferenceScorer(original, evaluation_split(tokenizer, corpus), ctx, eval_windows,
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
