"""The sweep plots, drawn from result rows (dicts).

Row schema (the columns of results.csv; a missing key or None means "not set"):
- axes: method (str), bits (int), granularity ("tensor" | "channel" | "gN"), asym (bool),
  clip (float, fraction of the min-max range), observer (str), alpha (float), act_bits (int),
  act_observer (str), act_granularity (str), gguf_type (str), budget (float, bits per weight),
  label (str) and options (JSON of method options) of an explicit point;
- metrics: bits_per_weight (float, the quantized linears' exact bits with scales), ppl (float),
  kl (float, mean KL to the original, nats per token), top1 (float, agreement with the original),
  quantize_s (float); status ("ok", "pending" or "error: ...").
Each plot uses only the rows with the keys it needs: ppl_vs_clip (clip, ppl), ppl_vs_act_bits
(act_bits, ppl), pareto (bits_per_weight, ppl, method).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lowbit.sweep.config import AXES, PLOTS, format_value, is_number


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def pareto_front(rows: Sequence[dict[str, Any]], x: str = "bits_per_weight",
                 y: str = "ppl") -> list[dict[str, Any]]:
    """The rows no other row beats on both x and y (lower is better for both; a row equal to
    an earlier one on both is dropped), sorted by x. Rows without finite x and y are ignored."""
    usable = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    front, best = [], math.inf
    for row in sorted(usable, key=lambda r: (r[x], r[y])):
        if row[y] < best:
            front.append(row)
            best = row[y]
    return front


def _finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


def _label(row: dict[str, Any], axes: Sequence[str]) -> str:
    parts = []
    for axis in axes:
        value = row.get(axis)
        if value is None or axis == "options":  # a labelled point's label names its options
            continue
        if axis == "bits":
            parts.append(f"int{value}")
        elif axis == "asym":
            parts.append("asym" if value else "sym")
        elif axis in ("method", "granularity", "gguf_type", "label"):
            parts.append(str(value))
        else:
            parts.append(f"{axis} {format_value(value)}")
    return " ".join(parts)


def plot_ppl_vs_clip(rows: Sequence[dict[str, Any]], path: Path,
                     reference_ppl: float | None = None) -> str | None:
    """Perplexity vs clip ratio, one line per setting of the other axes (bit width,
    granularity, ...; one color each) and observer; an observer that only ran at one clip ratio
    (it picks its own range) is a horizontal line in its setting's color, one dash style per
    observer. Returns why it was skipped, or None when drawn."""
    usable = [r for r in rows if r.get("clip") is not None and _finite(r.get("ppl"))]
    clips = sorted({r["clip"] for r in usable})
    if len(clips) < 2:
        return "needs rows with a clip axis of at least two ratios"
    varying = [a for a in AXES if a != "clip"
               and len({format_value(r.get(a)) for r in usable}) > 1]
    family_axes = [a for a in varying if a != "observer"]
    families = list(dict.fromkeys(_label(r, family_axes) or "all" for r in usable))
    observers = list(dict.fromkeys(format_value(r.get("observer")) for r in usable))
    dashes = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3))]
    groups: dict[tuple, list[dict]] = {}
    for row in usable:
        family = _label(row, family_axes) or "all"
        groups.setdefault((family, format_value(row.get("observer"))), []).append(row)
    figure, axes = _figure()
    for (family, observer), members in groups.items():
        members.sort(key=lambda r: r["clip"])
        color = f"C{families.index(family) % 10}"
        label = family + (f" observer {observer}" if "observer" in varying else "")
        if len(members) == 1:
            style = dashes[observers.index(observer) % len(dashes)]
            axes.axhline(members[0]["ppl"], color=color, linestyle=style, linewidth=1.2,
                         label=f"{label} (clip {format_value(members[0]['clip'])})")
        else:
            axes.plot([r["clip"] for r in members], [r["ppl"] for r in members], marker="o",
                      color=color, label=label)
    if reference_ppl:
        axes.axhline(reference_ppl, color="black", linestyle=":", label="original")
    axes.set_xlabel("clip ratio (fraction of the min-max range)")
    axes.invert_xaxis()
    _finish(axes)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return None


def plot_ppl_vs_act_bits(rows: Sequence[dict[str, Any]], path: Path,
                         reference_ppl: float | None = None) -> str | None:
    """Perplexity vs activation bit width, one line per setting of the other axes (the
    activation observer, ...). Returns why it was skipped, or None when drawn."""
    usable = [r for r in rows if r.get("act_bits") is not None and _finite(r.get("ppl"))]
    if len({r["act_bits"] for r in usable}) < 2:
        return "needs rows with an act_bits axis of at least two bit widths"
    varying = [a for a in AXES if a != "act_bits"
               and len({format_value(r.get(a)) for r in usable}) > 1]
    groups: dict[str, list[dict]] = {}
    for row in usable:
        groups.setdefault(_label(row, varying) or "all", []).append(row)
    figure, axes = _figure()
    for index, (label, members) in enumerate(groups.items()):
        members.sort(key=lambda r: r["act_bits"])
        axes.plot([r["act_bits"] for r in members], [r["ppl"] for r in members], marker="o",
                  color=f"C{index % 10}", linestyle=["-", "--"][index // 10 % 2], label=label)
    if reference_ppl:
        axes.axhline(reference_ppl, color="black", linestyle=":", label="original")
    axes.set_xlabel("activation bits")
    axes.set_xticks(sorted({r["act_bits"] for r in usable}))
    _finish(axes)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return None


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path,
                reference_ppl: float | None = None) -> str | None:
    """Bits per weight vs perplexity (log y), one color per method, the Pareto front as a
    line. Returns why it was skipped, or None when drawn."""
    usable = [r for r in rows if _finite(r.get("bits_per_weight")) and _finite(r.get("ppl"))]
    if not usable:
        return "needs rows with a finite bits_per_weight and ppl"
    figure, axes = _figure()
    methods = list(dict.fromkeys(r["method"] for r in usable))
    for index, method in enumerate(methods):
        members = [r for r in usable if r["method"] == method]
        axes.scatter([r["bits_per_weight"] for r in members], [r["ppl"] for r in members],
                     color=f"C{index % 10}", label=method, zorder=3)
    front = pareto_front(usable)
    axes.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], color="black",
              linewidth=1, drawstyle="steps-post", label="Pareto front", zorder=2)
    if reference_ppl:
        axes.axhline(reference_ppl, color="gray", linestyle=":", label="original")
    axes.set_xlabel("bits per weight (block linears)")
    _finish(axes)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return None


def _finish(axes) -> None:
    """Perplexity on a log axis with plain numbers, a grid, the legend outside on the right."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_ylabel("perplexity")
    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(plain)
    low, high = axes.get_ylim()
    # minor ticks labelled only when the axis spans less than a decade
    axes.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)  # the Agg backend, without pyplot's global state
    return figure, figure.add_subplot()


PLOT_FUNCTIONS = {"ppl_vs_clip": plot_ppl_vs_clip, "ppl_vs_act_bits": plot_ppl_vs_act_bits,
                  "pareto": plot_pareto}


def draw_plots(rows: Sequence[dict[str, Any]], directory: str | Path,
               which: Sequence[str] = PLOTS, reference_ppl: float | None = None,
               log: Callable[[str], None] = log_to_stderr) -> list[Path]:
    """Draws the named plots of the finished rows into directory/NAME.png; a plot whose data
    are missing is skipped with a message. Returns the files written."""
    written = []
    for name in which:
        if name not in PLOT_FUNCTIONS:
            raise ValueError(f"unknown plot {name!r}; allowed: {list(PLOT_FUNCTIONS)}")
        path = Path(directory) / f"{name}.png"
        reason = PLOT_FUNCTIONS[name](rows, path, reference_ppl)
        if reason:
            log(f"plot {name} skipped: {reason}")
        else:
            written.append(path)
    return written
