"""`lowbit export`: write a float model or a quantized checkpoint to a GGUF file that llama.cpp runs."""

from __future__ import annotations

import json
import sys

from lowbit.cli.output import print_table

HELP = "write a model (float or a quantized checkpoint) to a GGUF file that llama.cpp runs"


def add_arguments(parser) -> None:
    from lowbit.export import EXPORT_TYPES

    parser.add_argument("--model", required=True,
                        help="a quantized checkpoint directory, a registered name or a GGUF path")
    parser.add_argument("--format", default="gguf", help="output format (gguf, the only one)")
    parser.add_argument("--type", required=True, type=str.upper, choices=EXPORT_TYPES,
                        help="type of the linear weights")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args) -> None:
    import warnings

    from lowbit.export import export_gguf

    if args.format != "gguf":
        raise ValueError(f"--format must be gguf, got {args.format!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_gguf(args.model, args.out, args.type, force=args.force)
    report["warnings"] = sorted({str(w.message) for w in caught})
    for message in report["warnings"]:
        print(f"lowbit export: warning: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
        return
    print_table([{k: r.get(k, "") for k in ("name", "type", "weights", "exact", "mse", "note")}
                 for r in report["tensors"]])
    print(f"wrote {report['path']} ({report['bytes']} bytes, {report['type']}): "
          f"{report['exact_tensors']} of {len(report['tensors'])} tensors exact, added weight "
          f"MSE {report['weight_mse']:.4g}")
