"""What commands print: aligned text tables, Markdown tables, or one JSON object with --json."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def print_table(rows: list[dict], columns: list[str] | None = None, out=None) -> None:
    """Print dict rows as an aligned text table (floats to 4 significant digits)."""
    if not rows:
        return
    out = out or sys.stdout
    columns = columns or list(rows[0])

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)), file=out)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of the rows (floats to 4 decimals, or 1 decimal from 100 up)."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def emit(args, payload: dict, rows: list[dict], columns: list[str] | None = None) -> None:
    """One JSON object (the payload) with --json, else the rows as a table."""
    if getattr(args, "json", False):
        print(json.dumps(payload))
    else:
        print_table(rows, columns)


def show_progress(args) -> bool:
    """Progress bars unless --quiet or stderr is not a terminal."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()
