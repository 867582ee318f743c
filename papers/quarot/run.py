"""The QuaRot table: `lowbit quantize` (with and without --rotate) then `lowbit eval` of the saved
packed checkpoint on the pydoc evaluation split and on the out-of-domain 'licenses' text.

Each row runs the two CLI commands it prints, in this process, and appends one JSON line to
results/quarot/table.jsonl (git-ignored): method, weights, rotate, calibration source,
bits_per_weight, ppl per text.
    PYTHONPATH=. .venv/bin/python papers/quarot/run.py [--windows 4] [--methods rtn gptq awq]
        [--calib pydoc generated pydoc+generated] ...
`--methods llamacpp --weights Q4_0 Q3_K_S ...` adds llama.cpp's own types (needs llama-cpp-python,
the `ref` extra): SmolLM2's GGUF re-quantized by llama.cpp, evaluated as a GGUF.
`--methods mixed --budgets 3.25 ... [--candidates ...] [--base gptq]` adds mixed precision at each
bits-per-weight budget (lowbit quantize --method mixed; --weights is not used).
`--methods recipe --weights w4 w3 w2 ternary --calib pydoc+generated` runs the named recipes
(lowbit quantize --recipe NAME; their own specs, rotation, calibration sizes and E2E stage).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from lowbit.cli import run_json
from lowbit.ptq.recipes import get_recipe

TEXTS = ("pydoc", "licenses")


def evaluate(model: str, windows: int) -> dict:
    scores = {}
    for text in TEXTS:
        argv = ["eval", "--model", model, "--text", text, "--ctx", "512", "--windows", str(windows)]
        result = run_json(argv)
        scores[text] = {"ppl": round(result["ppl"], 4), "split": result["split"],
                        "windows": result["windows"], "command": "lowbit " + shlex.join(argv)}
    return scores


def llamacpp_gguf(gguf_type: str, workdir: Path) -> tuple[str, float]:
    """(path, bits per weight of the block linears) of SmolLM2's GGUF re-quantized by llama.cpp to
    `gguf_type` (its own per-tensor choices and fallbacks)."""
    from lowbit.models.registry import resolve_model
    from lowbit.ptq.llamacpp import linear_storage, llamacpp_quantize

    out = workdir / f"llamacpp-{gguf_type}.gguf"
    workdir.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    llamacpp_quantize(resolve_model("smollm2-135m"), out, gguf_type)
    bits, weights, _ = linear_storage(out)
    return str(out), round(bits / weights, 4)


def table(results: Path) -> str:
    """The markdown table of a results file: one row per (method, weights), without and with
    rotation side by side, ppl on both texts and the out-of-domain gap (licenses / pydoc)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    lines = ["| method | weights | rotate | calibration | bits/weight | ppl pydoc | ppl licenses | "
             "licenses / pydoc |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        pydoc, licenses = row["eval"]["pydoc"]["ppl"], row["eval"]["licenses"]["ppl"]
        bits = "f32 (Q4_1 source)" if row["method"] == "base" else f"{row['bits_per_weight']:.4f}"
        lines.append(f"| {row['method']} | {row['weights'] or '-'} | "
                     f"{'yes' if row['rotate'] else 'no'} | {row.get('calib') or '-'} | {bits} | "
                     f"{pydoc:.2f} | {licenses:.2f} | {licenses / pydoc:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["base", "rtn"])
    parser.add_argument("--weights", nargs="+", default=["int4:g64", "int3:g64", "int2:g64"])
    parser.add_argument("--rotate", nargs="+", default=["no", "yes"])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--calib", nargs="+", default=["pydoc"],
                        help="calibration sources of the calibrated methods (lowbit quantize --calib)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[3.25],
                        help="mixed: bits-per-weight budgets")
    parser.add_argument("--candidates", default="int2:g64,int3:g64,int4:g64",
                        help="mixed: candidate specs")
    parser.add_argument("--base", default="gptq", help="mixed: rtn or gptq")
    parser.add_argument("--workdir", default="/tmp/quarot")
    parser.add_argument("--results", default="results/quarot/table.jsonl")
    parser.add_argument("--table", action="store_true", help="print the results as markdown")
    args = parser.parse_args()
    results = Path(args.results)
    if args.table:
        print(table(results))
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        calibrated = method in ("gptq", "awq", "mixed")
        if method == "base":
            grid = [(None, None, None)]
        elif method == "llamacpp":  # llama.cpp's own types: no rotation, no calibration
            grid = [(w, "no", None) for w in args.weights]
        elif method == "recipe":  # the "weights" column names the recipe; it rotates itself
            grid = [(w, "yes" if get_recipe(w).rotate else "no", c) for w in args.weights
                    for c in args.calib]
        elif method == "mixed":  # the "weights" column names the budget and candidates
            budgets = {f"budget {b:g} over {args.base}: {args.candidates}": b for b in args.budgets}
            grid = [(w, r, c) for w in budgets for r in args.rotate for c in args.calib]
        else:
            grid = [(w, r, c) for w in args.weights for r in args.rotate
                    for c in (args.calib if calibrated else [None])]
        for weights, rotate, calib in grid:
            start = time.perf_counter()
            row = {"method": method, "weights": weights, "rotate": rotate == "yes", "calib": calib,
                   "date": time.strftime("%Y-%m-%d"), "machine": "2-core x86_64 CPU, shared"}
            model = "smollm2-135m"
            if method == "llamacpp":  # llama.cpp's own type (the `ref` extra): re-quantized GGUF
                model, row["bits_per_weight"] = llamacpp_gguf(weights, Path(args.workdir))
                row["quantize_command"] = f"lowbit.ptq.llamacpp.llamacpp_quantize(source, out, {weights!r})"
            elif method != "base":
                name = f"{method}-{weights}-{rotate}" + (f"-{calib}" if calib else "")
                out = Path(args.workdir) / "".join(c if c.isalnum() or c in "-." else "_"
                                                   for c in name)
                shutil.rmtree(out, ignore_errors=True)
                argv = ["quantize", "--model", model, "--out", str(out)]
                if method == "recipe":  # its specs, rotation and calibration sizes are its own
                    argv += ["--recipe", weights, "--calib", calib]
                else:
                    argv += ["--method", method]
                    argv += (["--budget", f"{budgets[weights]:g}", "--candidates", args.candidates,
                              "--base", args.base] if method == "mixed" else ["--weights", weights])
                    if calibrated:
                        argv += ["--calib", calib, "--calib-samples", str(args.calib_samples),
                                 "--calib-len", str(args.calib_len)]
                    if rotate == "yes":
                        argv.append("--rotate")
                summary = run_json(argv)
                row.update(bits_per_weight=summary["bits_per_weight"],
                           quantize_seconds=summary["quantize_seconds"],
                           quantize_command="lowbit " + shlex.join(argv))
                if "e2e" in summary:
                    row["e2e"] = summary["e2e"]
                if "spec_counts" in summary.get("settings", {}):  # mixed: linears per spec
                    row["spec_counts"] = summary["settings"]["spec_counts"]
                model = str(out)
            row["eval"] = evaluate(model, args.windows)
            row["seconds"] = round(time.perf_counter() - start, 1)
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            if method == "llamacpp":
                Path(model).unlink()
            elif method != "base":
                shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
