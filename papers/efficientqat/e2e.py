"""E2E-QP on a saved packed checkpoint (a recipe's second stage): train only its scales by KL to
SmolLM2's own Q4_1 GGUF, save the result; prints the report (KL, wall and CPU seconds) as JSON.

PYTHONPATH=. .venv/bin/python papers/efficientqat/e2e.py --source DIR --out DIR2 [--steps 8]
"""

import argparse
import json
import resource
import time

from lowbit import checkpoint
from lowbit.cli.quantize import calibration_set
from lowbit.models.loader import load_gguf_model
from lowbit.models.registry import resolve_model
from lowbit.models.tokenizer import Tokenizer
from lowbit.ptq.e2e import e2e_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True, help="a packed checkpoint of SmolLM2-135M")
    parser.add_argument("--out", required=True, help="new checkpoint directory")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--kl-batches", type=int, default=2)
    parser.add_argument("--calib", default="pydoc",
                        help="calibration spec as `lowbit quantize --calib` (pydoc, generated: the teacher's "
                             "own samples, FILE, or a mixture such as pydoc+generated)")
    parser.add_argument("--seed", type=int, default=1, help="calibration windows (the recipes: 1)")
    args = parser.parse_args()
    path = resolve_model("smollm2-135m")
    model = checkpoint.load(args.source)
    teacher, _ = load_gguf_model(path, runtime="packed")
    tokens = calibration_set(teacher, Tokenizer.from_gguf(path), args.calib, args.samples, args.length,
                             args.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    report = e2e_train(model, teacher, tokens, steps=args.steps, learning_rate=args.learning_rate,
                       batch_size=args.batch_size, kl_batches=args.kl_batches,
                       workdir=args.out + "-work", checkpoint_every=2, progress=True)
    report.update(wall_s=round(time.perf_counter() - wall, 1),
                  cpu_s=round(time.process_time() - cpu, 1),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    info = checkpoint.read_info(args.source)
    info["e2e"] = {**report, "calibration": {"source": args.calib, "seed": args.seed}}
    checkpoint.save(model, args.out, info=info)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
