"""Bits per weight against perplexity for every measured SmolLM2 point of papers/quarot and
papers/efficientqat (RTN, GPTQ, AWQ with and without rotation, Block-AP, mixed precision, the
recipes with E2E, llama.cpp's own types), on the pydoc evaluation split and the out-of-domain
licenses text, with each text's Pareto front (lowest perplexity at or below each bit count).

    PYTHONPATH=. .venv/bin/python papers/quarot/pareto.py [--out papers/quarot/pareto.png]

Reads the JSON lines the runs wrote (each row: method, weights, rotate, calib, bits_per_weight,
eval.<text>.ppl); prints the front of each text as a markdown table and writes the plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
TABLES = [HERE / name for name in ("table.jsonl", "calibration.jsonl", "calibration64.jsonl",
                                   "llamacpp.jsonl", "awq.jsonl", "mixed.jsonl", "recipes.jsonl")] + \
         [HERE.parent / "efficientqat" / "table.jsonl"]
TEXTS = ("pydoc", "licenses")
CEILING = 1e4  # collapsed points (perplexity above this) are drawn on the plot's top edge
STYLE = {"rtn": ("tab:gray", "o"), "gptq": ("tab:blue", "s"), "awq": ("tab:green", "D"),
         "blockap": ("tab:purple", "v"), "mixed": ("tab:orange", "P"),
         "llamacpp": ("black", "x"), "recipe": ("tab:red", "*")}


def label(row: dict) -> str:
    """One line naming the point: method, weights, rotation, calibration (and its size)."""
    parts = [row["method"], row.get("weights") or ""]
    if row.get("rotate"):
        parts.append("rotated")
    if row.get("calib"):
        command = (row.get("quantize_command") or "").split()
        size = ""
        if "--calib-samples" in command and "--calib-len" in command:
            size = (f" {command[command.index('--calib-samples') + 1]}x"
                    f"{command[command.index('--calib-len') + 1]}")
        parts.append(f"calib {row['calib']}{size}")
    return " ".join(p for p in parts if p)


def load_points(tables: list[Path]) -> tuple[dict[str, float], list[dict]]:
    """(base perplexity per text, the quantized points), each point a row with its label,
    family (STYLE key) and bits; of rows with the same label the last one read is kept (a
    rerun appended to a file replaces the earlier row)."""
    base: dict[str, float] = {}
    points: dict[str, dict] = {}
    for table in tables:
        if not table.exists():
            continue
        for line in table.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            ppl = {text: row["eval"][text]["ppl"] for text in TEXTS}
            if row["method"] == "base":
                base = ppl
                continue
            family = row["method"].split(":")[0]
            points[label(row)] = {"label": label(row), "family": family,
                                  "rotate": bool(row.get("rotate")),
                                  "bits": float(row["bits_per_weight"]), "ppl": ppl}
    return base, list(points.values())


def front(points: list[dict], text: str) -> list[dict]:
    """The Pareto front on `text`: points no other point beats on both bits and perplexity."""
    best, kept = float("inf"), []
    for point in sorted(points, key=lambda p: (p["bits"], p["ppl"][text])):
        if point["ppl"][text] < best:
            best = point["ppl"][text]
            kept.append(point)
    return kept


def plot(base: dict[str, float], points: list[dict], out: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    for axis, text in zip(axes, TEXTS):
        for family, (color, marker) in STYLE.items():
            for rotate in (False, True):
                chosen = [p for p in points if p["family"] == family and p["rotate"] == rotate]
                if not chosen:
                    continue
                axis.scatter([p["bits"] for p in chosen],
                             [min(p["ppl"][text], CEILING) for p in chosen], color=color,
                             marker=marker, s=55, alpha=0.85,
                             facecolors=color if rotate or marker == "x" else "none",
                             label=f"{family}{' rotated' if rotate else ''}")
        edge = front(points, text)
        axis.step([p["bits"] for p in edge], [min(p["ppl"][text], CEILING) for p in edge],
                  where="post", color="tab:red", linewidth=1, alpha=0.6)
        axis.axhline(base[text], color="black", linestyle="--", linewidth=1,
                     label=f"base {base[text]:.2f}")
        axis.set_yscale("log")
        axis.set_ylim(top=CEILING * 1.5)
        axis.set_title(f"{text} ({'out of domain' if text == 'licenses' else 'calibration domain'})")
        axis.set_xlabel("bits per weight (block linears, scales included)")
        axis.set_ylabel(f"perplexity, 4 windows of 512 (points above {CEILING:g} at the top)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    figure.suptitle("SmolLM2-135M: bits per weight vs perplexity (papers/quarot/pareto.py)")
    figure.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=110)
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "pareto.png"))
    args = parser.parse_args()
    base, points = load_points(TABLES)
    if not base or not points:
        raise ValueError("no base row or no quantized points in " + ", ".join(map(str, TABLES)))
    for text in TEXTS:
        print(f"\nPareto front on {text} (base {base[text]:.2f}):\n")
        print("| bits/weight | ppl | vs base | point |\n|---|---|---|---|")
        for point in front(points, text):
            ppl = point["ppl"][text]
            print(f"| {point['bits']:.4f} | {ppl:.2f} | {100 * (ppl / base[text] - 1):+.1f}% | "
                  f"{point['label']} |")
    plot(base, points, Path(args.out))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
