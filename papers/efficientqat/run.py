"""The EfficientQAT (Block-AP) table: SmolLM2-135M quantized with method 'blockap' through
lowbit.ptq.quantize (pydoc calibration, the `lowbit quantize` windows), saved packed, then
`lowbit eval` on the pydoc evaluation split and on the out-of-domain 'licenses' text.

Appends one JSON line per run to results/efficientqat/table.jsonl (git-ignored).
    PYTHONPATH=. .venv/bin/python papers/efficientqat/run.py --weights int3:g64 --steps 24
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

from lowbit.cli import run_json

TEXTS = ("pydoc", "licenses")


def quantize_to(out: Path, args) -> dict:
    """Block-AP of every block linear of SmolLM2-135M, saved packed to `out`."""
    import lowbit
    from lowbit.data.corpus import calibration_tokens
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model, sha256_of
    from lowbit.models.tokenizer import Tokenizer
    from lowbit.nn import QuantRule
    from lowbit.ptq.driver import LLAMA_BLOCK_LINEARS
    from lowbit.ptq.methods import quantize

    path = resolve_model("smollm2-135m")
    model, _ = load_gguf_model(path)
    tokens = calibration_tokens(Tokenizer.from_gguf(path), "pydoc", args.calib_samples,
                                args.calib_len, 0)
    batches = [tokens[i:i + args.batch_size] for i in range(0, len(tokens), args.batch_size)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*match no rule and stay float.*")
        result = quantize(model, QuantRule(path=LLAMA_BLOCK_LINEARS, weight_spec=args.weights),
                          "blockap", batches, steps=args.steps, learn=args.learn, init=args.init,
                          weight_lr=args.weight_lr, scale_lr=args.scale_lr,
                          workdir=str(out.with_name(out.name + "-blocks")), progress=True,
                          rotate=args.rotate)
    report = result.report()
    source = {"model": "smollm2-135m", "path": str(Path(path).resolve()),
              "sha256": sha256_of(path)}
    shutil.rmtree(out, ignore_errors=True)  # a checkpoint of an earlier run of these settings
    lowbit.save(model, out, info={"method": "blockap", "settings": report["settings"],
                                  "source": source, "report": report})
    return {"bits_per_weight": round(report["bits_per_weight"], 4),
            "quantize_seconds": round(result.seconds, 1),
            "block_losses": [(b["initial_loss"], b["final_loss"]) for b in result.block_reports]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", default="int3:g64")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--learn", default="weights+scales")
    parser.add_argument("--init", default="rtn")
    parser.add_argument("--weight-lr", type=float, default=3e-4)
    parser.add_argument("--scale-lr", type=float, default=3e-4)
    parser.add_argument("--rotate", action="store_true", help="QuaRot rotation first")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--workdir", default="/tmp/efficientqat")
    parser.add_argument("--results", default="results/efficientqat/table.jsonl")
    args = parser.parse_args()
    start = time.perf_counter()
    name = f"blockap-{args.weights.replace(':', '_')}-{args.learn}-{args.init}-{args.steps}" + ("-rot" if args.rotate else "")
    out = Path(args.workdir) / name
    row = {"method": "blockap", "weights": args.weights, "learn": args.learn, "init": args.init,
           "steps": args.steps, "rotate": args.rotate, "weight_lr": args.weight_lr, "scale_lr": args.scale_lr,
           "calibration": f"pydoc {args.calib_samples} x {args.calib_len}, batches of "
                          f"{args.batch_size}", "date": time.strftime("%Y-%m-%d"),
           "machine": "2-core x86_64 CPU, shared",
           "command": "PYTHONPATH=. .venv/bin/python papers/efficientqat/run.py "
                      + shlex.join(sys.argv[1:])}
    row.update(quantize_to(out, args))
    row["eval"] = {}
    for text in TEXTS:
        argv = ["eval", "--model", str(out), "--text", text, "--ctx", "512",
                "--windows", str(args.windows)]
        result = run_json(argv)
        row["eval"][text] = {"ppl": round(result["ppl"], 4), "windows": result["windows"],
                             "command": "lowbit " + shlex.join(argv)}
    row["seconds"] = round(time.perf_counter() - start, 1)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
