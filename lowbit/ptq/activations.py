"""Per-layer statistics of the inputs of every block linear of a Llama model (absmax,
percentiles of |x|, kurtosis, LLM.int8()-style outlier feature dimensions), saved as JSON and
plotted (`lowbit activations`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowbit.files import write_text_atomic
from lowbit.ptq.driver import (ABS_MAX, COUNT, INPUT_GROUPS, Statistic, run_sequential,
                               strided_sample)

OUTLIER_THRESHOLD = 6.0  # LLM.int8(): a feature is an outlier where |x| >= 6
PERCENTILES = (50.0, 99.0, 99.9, 99.99)
# LLM.int8()'s rule for a systematic outlier dimension: present in at least 25% of the layers
# and in at least 6% of the tokens (sequence positions).
LAYER_SHARE = 0.25
TOKEN_SHARE = 0.06
# The inputs that read the residual stream (through an RMSNorm): their features are the same
# d_model dimensions in every layer, so an outlier dimension can be followed across layers.
RESIDUAL_GROUPS = ("attn_in", "mlp_in")
SAMPLE_STRIDE = 8  # every 8th token's features go into the percentile sample


def _moments(x):
    xf = x.astype(jnp.float32)
    return jnp.stack([jnp.sum(xf), jnp.sum(xf ** 2), jnp.sum(xf ** 3), jnp.sum(xf ** 4)])


def _outlier_tokens_per_feature(x):
    return (jnp.abs(x) >= OUTLIER_THRESHOLD).astype(jnp.float32).sum(axis=0)


def _tokens_with_outlier(x):
    return jnp.any(jnp.abs(x) >= OUTLIER_THRESHOLD, axis=-1).astype(jnp.float32).sum()


MOMENTS = Statistic("moments", _moments, "sum")
OUTLIER_TOKENS = Statistic("outlier_tokens", _outlier_tokens_per_feature, "sum")
TOKENS_WITH_OUTLIER = Statistic("tokens_with_outlier", _tokens_with_outlier, "sum")
PLAN = {group: (ABS_MAX, COUNT, MOMENTS, OUTLIER_TOKENS, TOKENS_WITH_OUTLIER,
                strided_sample(SAMPLE_STRIDE)) for group in INPUT_GROUPS}


def kurtosis_from_moments(moments, n: float) -> float:
    """Pearson kurtosis E[(x-mu)^4] / var^2 (3 for a Gaussian) from raw power sums."""
    s1, s2, s3, s4 = (float(m) / n for m in np.asarray(moments, np.float64))
    var = s2 - s1 ** 2
    if var <= 0:
        return float("nan")
    m4 = s4 - 4 * s1 * s3 + 6 * s1 ** 2 * s2 - 3 * s1 ** 4
    return m4 / var ** 2


def _group_summary(stats: dict[str, Any]) -> dict[str, Any]:
    tokens = float(stats["count"])
    absmax = np.asarray(stats["abs_max"])
    sample = np.abs(np.asarray(stats[f"rows_every_{SAMPLE_STRIDE}"])).reshape(-1)
    outlier_tokens = np.asarray(stats["outlier_tokens"])
    return {
        "tokens": int(tokens),
        "features": int(absmax.size),
        "absmax": float(absmax.max()),
        "percentiles": {str(p): float(np.percentile(sample, p)) for p in PERCENTILES},
        "kurtosis": kurtosis_from_moments(stats["moments"], tokens * absmax.size),
        "outlier_features": [int(i) for i in np.flatnonzero(absmax >= OUTLIER_THRESHOLD)],
        "outlier_token_share": float(stats["tokens_with_outlier"]) / tokens,
        "outlier_tokens_per_feature": {int(i): int(outlier_tokens[i])
                                       for i in np.flatnonzero(outlier_tokens)},
    }


def outlier_dimensions(layers: list[dict[str, Any]],
                       groups: Sequence[str] = RESIDUAL_GROUPS) -> list[dict[str, Any]]:
    """LLM.int8()-style outlier feature dimensions over the residual-stream inputs.

    For each feature with |x| >= 6 anywhere: layer_share = share of the (layer, group) inputs
    where it reaches 6; token_share = share of the tokens where it does, averaged over the
    inputs where it occurs; systematic = layer_share >= 25% and token_share >= 6%. Sorted by
    layer_share.
    """
    inputs = [layer[g] for layer in layers for g in groups]
    if not inputs:
        raise ValueError("outlier_dimensions needs at least one layer")
    hits: dict[int, list[float]] = {}
    for entry in inputs:
        for feature, count in entry["outlier_tokens_per_feature"].items():
            hits.setdefault(int(feature), []).append(count / entry["tokens"])
    dims = [{"feature": f, "layer_share": len(shares) / len(inputs),
             "token_share": float(np.mean(shares))} for f, shares in hits.items()]
    for d in dims:
        d["systematic"] = d["layer_share"] >= LAYER_SHARE and d["token_share"] >= TOKEN_SHARE
    return sorted(dims, key=lambda d: (-d["layer_share"], -d["token_share"], d["feature"]))


def activation_statistics(model, calibration, *, batch_size: int = 4,
                          progress: bool = True) -> dict[str, Any]:
    """Statistics of every block linear's input over the calibration tokens [samples, seq].

    Returns {"layers": [{group: summary}], "outlier_dimensions": [...], "threshold": 6.0};
    a group summary holds absmax, percentiles of |x| (on every 8th token), kurtosis, the
    features reaching |x| >= 6 and the share of tokens that have one.
    """
    layers = run_sequential(
        model, calibration,
        lambda context: {g: _group_summary(s) for g, s in context.statistics(PLAN).items()},
        batch_size=batch_size, progress=progress, desc="activations")
    return {"threshold": OUTLIER_THRESHOLD, "layers": layers,
            "outlier_dimensions": outlier_dimensions(layers)}


def save_json(stats: dict[str, Any], path: str | Path) -> Path:
    """Writes the statistics as JSON (temporary file, then rename)."""
    return write_text_atomic(path, json.dumps(stats, indent=1))


def plot(stats: dict[str, Any], path: str | Path) -> Path:
    """Absmax, 99.99th percentile and kurtosis per layer for each input group (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = stats["layers"]
    index = np.arange(len(layers))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for group in INPUT_GROUPS:
        axes[0].plot(index, [layer[group]["absmax"] for layer in layers], marker=".", label=group)
        axes[1].plot(index, [layer[group]["percentiles"]["99.99"] for layer in layers],
                     marker=".", label=group)
        axes[2].plot(index, [layer[group]["kurtosis"] for layer in layers], marker=".",
                     label=group)
    for axis, title in zip(axes, ("max |x|", "99.99th percentile of |x|", "kurtosis (Gaussian: 3)")):
        axis.set_yscale("log")
        axis.set_xlabel("block")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].axhline(stats["threshold"], color="grey", linestyle="--", linewidth=1)
    axes[0].legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def summary_table(stats: dict[str, Any]) -> str:
    """A Markdown table: one row per block and input group."""
    lines = ["| block | input | max abs | p99.99 | kurtosis | features >= 6 | tokens with one |",
             "|---|---|---|---|---|---|---|"]
    for index, layer in enumerate(stats["layers"]):
        for group, s in layer.items():
            lines.append(f"| {index} | {group} | {s['absmax']:.1f} | {s['percentiles']['99.99']:.2f}"
                         f" | {s['kurtosis']:.1f} | {len(s['outlier_features'])} | "
                         f"{100 * s['outlier_token_share']:.1f}% |")
    return "\n".join(lines)
