"""The `lowbit` command: readable tables by default, one JSON object with --json."""

from __future__ import annotations

import argparse
import json
import sys


def print_table(rows: list[dict], columns: list[str] | None = None, out=sys.stdout) -> None:
    """Print dict rows as an aligned text table (floats to 4 significant digits)."""
    if not rows:
        return
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


def _emit(args, payload: dict, rows: list[dict], columns: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps(payload, indent=None))
    else:
        print_table(rows, columns)


def cmd_specs(args) -> None:
    from lowbit.core.error import TABLE_SPECS, quantization_error, synthetic_weights

    specs = args.spec or list(TABLE_SPECS)
    rows = []
    for dist in ("gaussian", "laplace"):
        x = synthetic_weights(dist, (args.rows, args.cols))
        for spec in specs:
            e = quantization_error(x, spec)
            rows.append({"data": dist, "spec": e.spec, "bits_per_weight": round(e.bits_per_weight, 4),
                         "mse": e.mse, "snr_db": round(e.snr_db, 2)})
    _emit(args, {"rows": rows}, rows)


def cmd_fetch(args) -> None:
    from lowbit.models.registry import fetch, sha256_of

    path = fetch(args.name)
    info = {"name": args.name, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    _emit(args, info, [info])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit and ternary models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = add("specs", cmd_specs, "quantization error (MSE, SNR, bits per weight) of each spec on synthetic data")
    p.add_argument("--spec", action="append", help="a spec string (repeatable); default: a table of common specs")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)

    p = add("fetch", cmd_fetch, "download a named model into the cache and verify it")
    p.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"lowbit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
