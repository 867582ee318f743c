"""`lowbit demo` (what `make demo` runs): SmolLM2-135M quantized with RTN, GPTQ and AWQ at int4 g64
and int3 g64, each scored on the pydoc evaluation split against the original; the table is written
to results/demo.md and compared with the one in README.md."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.cli.output import markdown_table, show_progress

HELP = "the demo table: RTN, GPTQ and AWQ at int4/int3 g64 on SmolLM2, compared with README.md's"
DEMO_SPECS = ("int4:g64:asym", "int3:g64:asym")
DEMO_METHODS = ("rtn", "gptq", "awq")
# Sized for about 10 minutes on a shared 2-core CPU.
DEMO_CALIB_SAMPLES = 4
DEMO_CALIB_LEN = 512
DEMO_EVAL_WINDOWS = 4
DEMO_CTX = 512
DEMO_AWQ = {"search_sequences": 1, "search_tokens": 256, "clip_tokens": 128}
COLUMNS = ("method", "weights", "bits_per_weight", "ppl", "kl", "top1", "quantize_s")
COMPARED = ("bits_per_weight", "ppl", "kl", "top1")  # quantize_s is a time, not a result
README_BEGIN = "<!-- lowbit demo table: begin -->"
README_END = "<!-- lowbit demo table: end -->"


def demo_runs(methods: Sequence[str] = DEMO_METHODS, specs: Sequence[str] = DEMO_SPECS,
              awq_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every method at every spec, spec-major, as run descriptions for run_ptq_table."""
    return [{"method": m, "weights": s, "options": dict(awq_options or {}) if m == "awq" else {}}
            for s in specs for m in methods]


def readme_table(text: str) -> list[dict[str, str]] | None:
    """The rows (column -> cell text) of the demo table between README's markers, or None."""
    match = re.search(re.escape(README_BEGIN) + r"(.*?)" + re.escape(README_END), text, re.S)
    if match is None:
        return None
    lines = [line.strip() for line in match.group(1).strip().splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return None
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def differences(rows: Sequence[dict[str, Any]], recorded: Sequence[dict[str, str]]) -> list[str]:
    """Where a fresh run's rows differ from a recorded table (cells of COMPARED as printed)."""
    fresh = readme_table(f"{README_BEGIN}\n{markdown_table(rows, COLUMNS)}\n{README_END}")
    if [(r["method"], r["weights"]) for r in fresh] != [(r.get("method"), r.get("weights")) for r in recorded]:
        return ["the rows (method, weights) differ"]
    return [f"{new['method']} {new['weights']} {column}: {old.get(column)} recorded, {new[column]} now"
            for new, old in zip(fresh, recorded) for column in COMPARED if new[column] != old.get(column)]


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-samples", type=int, default=DEMO_CALIB_SAMPLES)
    parser.add_argument("--calib-len", type=int, default=DEMO_CALIB_LEN)
    parser.add_argument("--eval-windows", type=int, default=DEMO_EVAL_WINDOWS)
    parser.add_argument("--out", default="results/demo.md", help="where the Markdown table is written")
    parser.add_argument("--readme", default="README.md", help="the README whose demo table is compared")


def run(args) -> int:
    import json

    from lowbit.files import write_text_atomic
    from lowbit.sweep.runs import run_ptq_table

    start = time.perf_counter()
    rows = run_ptq_table(demo_runs(awq_options=DEMO_AWQ), args.model, calib_samples=args.calib_samples,
                         calib_len=args.calib_len, eval_windows=args.eval_windows, ctx=DEMO_CTX,
                         progress=show_progress(args))
    total = time.perf_counter() - start
    table = markdown_table(rows, COLUMNS)
    settings = (f"calibration {args.calib_samples} x {args.calib_len} pydoc tokens (seed 0); evaluation "
                f"{args.eval_windows} windows of {DEMO_CTX} from the pydoc evaluation split, every position "
                f"after the first scored; total {total:.0f} s")
    write_text_atomic(args.out, table + "\n\n" + settings + "\n")
    readme = Path(args.readme)
    recorded = readme_table(readme.read_text(encoding="utf-8")) if readme.is_file() else None
    default_settings = (args.model, args.calib_samples, args.calib_len, args.eval_windows) == \
        ("smollm2-135m", DEMO_CALIB_SAMPLES, DEMO_CALIB_LEN, DEMO_EVAL_WINDOWS)
    if recorded is None or not default_settings:
        comparison = None
    else:
        comparison = differences(rows, recorded)
    if args.json:
        print(json.dumps({"rows": rows, "total_seconds": round(total, 1), "table": args.out,
                          "readme_differences": comparison}))
        return 0
    print(table)
    print(f"\n{settings}; table written to {args.out}")
    if comparison == []:
        print(f"{readme}: its demo table holds the same figures")
    elif comparison:
        print(f"{readme}: its demo table differs ({len(comparison)} cells):\n  " + "\n  ".join(comparison))
    return 0
