"""PTQ sweeps on SmolLM2-135M behind papers/{gptq,awq,smoothquant,llm-int8}: each run quantizes a
fresh copy of the model and is scored against the original on the pydoc evaluation split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lowbit.ptq.demo import format_table, run_ptq_table  # noqa: E402

WEIGHT_SPECS = ("int4:g64:asym", "int3:g64:asym", "int3:channel:asym", "int4:channel:asym",
                "int2:g32:asym", "int4:g128:asym", "int3:g128:asym")
AWQ_OPTIONS = {"search_sequences": 1, "search_tokens": 512, "clip_tokens": 256}
SQ_ALPHAS = (0.0, 0.25, 0.5, 0.65, 0.75, 0.85, 0.95, 1.0)
ACT_SPECS = {"O1": "int8:token", "O2": "int8:tensor", "O3": "int8:tensor:static"}


def weight_runs() -> list[dict]:
    runs = []
    for spec in WEIGHT_SPECS:
        runs += [{"method": "rtn", "weights": spec, "label": ""},
                 {"method": "gptq", "weights": spec, "label": ""},
                 {"method": "awq", "weights": spec, "label": "", "options": AWQ_OPTIONS}]
        if spec == "int3:channel:asym":
            runs.append({"method": "gptq", "weights": spec, "label": "act-order",
                         "options": {"act_order": True}})
    # The base model's own grid (Q4_1: asymmetric groups of 32): RTN should be nearly lossless.
    runs.append({"method": "rtn", "weights": "int4:g32:asym", "label": "Q4_1 grid"})
    return runs


def w8a8_runs() -> list[dict]:
    runs = []
    for level, act in ACT_SPECS.items():  # per-tensor int8 weights, as SmoothQuant's O1-O3
        runs.append({"method": "smoothquant", "weights": "int8", "label": f"naive {level}",
                     "options": {"act": act, "alpha": None}})
        runs.append({"method": "smoothquant", "weights": "int8", "label": f"{level} alpha 0.85",
                     "options": {"act": act, "alpha": 0.85}})
    for alpha in SQ_ALPHAS:
        if alpha != 0.85:
            runs.append({"method": "smoothquant", "weights": "int8", "label": f"O3 alpha {alpha}",
                         "options": {"act": ACT_SPECS["O3"], "alpha": alpha}})
    for level in ("O1", "O3"):  # our extension: the down input smoothed through w_up too
        for alpha in (0.5, 0.85):
            runs.append({"method": "smoothquant", "weights": "int8",
                         "label": f"{level} alpha {alpha} + down smoothed",
                         "options": {"act": ACT_SPECS[level], "alpha": alpha,
                                     "smooth_down": True}})
    # Per-channel int8 weights (the issue allows both): the smoothing scales then no longer
    # widen one shared weight range.
    runs.append({"method": "smoothquant", "weights": "int8:channel", "label": "naive O3",
                 "options": {"act": ACT_SPECS["O3"], "alpha": None}})
    for alpha in (0.25, 0.4, 0.5, 0.6, 0.7, 0.85, 0.95, 1.0):
        for down in (False, True) if alpha in (0.5, 0.85) else (True,):
            runs.append({"method": "smoothquant", "weights": "int8:channel",
                         "label": f"O3 alpha {alpha}" + (" + down smoothed" if down else ""),
                         "options": {"act": ACT_SPECS["O3"], "alpha": alpha,
                                     "smooth_down": down}})
    # How much of the W8A8 / LLM.int8() loss is the int8 weights alone (no activation rounding).
    runs += [{"method": "rtn", "weights": w, "label": "weights only"}
             for w in ("int8", "int8:channel")]
    for threshold in (6.0, 3.0, None):
        label = "vector-wise (no outliers)" if threshold is None else f"threshold {threshold}"
        runs.append({"method": "llm_int8", "weights": "int8:channel", "label": label,
                     "options": {"threshold": threshold}})
    return runs


def calibration_runs() -> list[dict]:
    """The 4-bit and 3-bit g64 GPTQ / AWQ runs again, for a larger --calib-samples."""
    return [{"method": m, "weights": s, "label": "",
             "options": AWQ_OPTIONS if m == "awq" else {}}
            for s in ("int4:g64:asym", "int3:g64:asym") for m in ("gptq", "awq")]


def ablation_runs() -> list[dict]:
    """AWQ at int3 g64 with and without its two parts (scale search, clipping search)."""
    spec = "int3:g64:asym"
    return [{"method": "awq", "weights": spec, "label": "", "options": AWQ_OPTIONS},
            {"method": "awq", "weights": spec, "label": "scales only (no clipping)",
             "options": {**AWQ_OPTIONS, "clip": False}},
            {"method": "awq", "weights": spec, "label": "clipping only (alpha 0)",
             "options": {**AWQ_OPTIONS, "grid": (0.0,)}}]


LLAMACPP_TYPES = ("Q8_0", "Q5_0", "Q4_1", "Q4_K_M", "Q4_0", "Q3_K_S", "Q2_K")


def llamacpp_runs() -> list[dict]:
    """llama.cpp's own re-quantization of the model (needs the `ref` extra), and lowbit's methods
    on Q4_0's budget: symmetric groups of 32 with an f16 scale, 4.5 bits per weight."""
    runs = [{"method": "llamacpp", "weights": t, "label": ""} for t in LLAMACPP_TYPES]
    runs += [{"method": m, "weights": "int4:g32", "label": "",
              "options": AWQ_OPTIONS if m == "awq" else {}} for m in ("rtn", "gptq", "awq")]
    return runs


SUITES = {"weights": weight_runs, "llamacpp": llamacpp_runs, "w8a8": w8a8_runs, "calibration": calibration_runs,
          "ablation": ablation_runs}
USAGE = """
  .venv/bin/python experiments/ptq/sweep.py weights                          # RTN/GPTQ/AWQ specs
  .venv/bin/python experiments/ptq/sweep.py w8a8 --calib-samples 4           # SmoothQuant, int8
  .venv/bin/python experiments/ptq/sweep.py calibration --calib-samples 32   # more calibration
  .venv/bin/python experiments/ptq/sweep.py ablation                         # AWQ's two parts
  .venv/bin/python experiments/ptq/sweep.py llamacpp                         # vs llama.cpp types
Rows are appended to results/ptq/<suite>.jsonl (or --out) as they finish and a rerun skips rows
already there; the Markdown table is printed at the end.
"""


def weights_pivot(rows: list[dict]) -> str:
    """One line per weight spec: RTN / GPTQ / AWQ perplexity, KL and quantization time."""
    by = {(r["method"], r["weights"]): r for r in rows if not r.get("label")}
    lines = ["| weights | bits/weight | ppl RTN | ppl GPTQ | ppl AWQ | KL RTN | KL GPTQ | KL AWQ "
             "| s GPTQ | s AWQ |", "|" + "---|" * 10]
    for spec in WEIGHT_SPECS:
        cells = [by.get((m, spec)) for m in ("rtn", "gptq", "awq")]
        if cells[0] is None:
            continue
        ppl = [f"{c['ppl']:.2f}" if c else "" for c in cells]
        kl = [f"{c['kl']:.3f}" if c else "" for c in cells]
        sec = [f"{c['quantize_s']:.0f}" if c else "" for c in cells[1:]]
        lines.append(f"| {spec} | {cells[0]['bits_per_weight']:.3f} | " +
                     " | ".join(ppl + kl + sec) + " |")
    return "\n".join(lines)


def _key(row: dict) -> tuple:
    return row["method"], row["weights"], row.get("label", "")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, epilog=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--out", default=None,
                        help="JSON lines file (default results/ptq/<suite>.jsonl)")
    args = parser.parse_args(argv)
    out = Path(args.out or f"results/ptq/{args.suite}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[_key(row)] = row
    runs = [r for r in SUITES[args.suite]() if _key(r) not in done]
    start = time.perf_counter()

    def save(row):
        row = {**row, "calibration": f"{args.calib_samples} x {args.calib_len}",
               "eval_windows": args.eval_windows}
        if _key(row) not in done:
            done[_key(row)] = row
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        print(f"[{time.perf_counter() - start:7.0f} s] {json.dumps(row)}", flush=True)

    if runs:
        run_ptq_table(runs, calib_samples=args.calib_samples, calib_len=args.calib_len,
                      eval_windows=args.eval_windows, on_row=save)
    rows = [done[k] for k in [("original", "gguf Q4_1", "")] + [_key(r) for r in
                                                                  SUITES[args.suite]()]
            if k in done]
    print(format_table(rows))
    if args.suite == "weights":
        print()
        print(weights_pivot(rows))
    return rows


if __name__ == "__main__":
    main()
