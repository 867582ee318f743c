"""Plain-text tables for the command line (aligned columns, numbers right-aligned)."""

from __future__ import annotations

import sys


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
