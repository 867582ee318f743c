"""Benchmark GPTQ on the whole SmolLM2-135M: wall time per stage and peak resident memory.

Default: 128 x 512 pydoc calibration tokens, int4:g64:asym; `--help` lists the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np


from lowbit.models.loader import load_gguf_model
from lowbit.models.registry import resolve_model
from lowbit.models.tokenizer import Tokenizer
from lowbit.ptq import driver, gptq
from lowbit.data.corpus import calibration_tokens


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StageTimer:
    """Accumulates wall time of wrapped functions by stage name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return out
        return timed


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="int4:g64:asym")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    path = resolve_model(args.model)
    start = time.perf_counter()
    model, _ = load_gguf_model(path)
    load_s = time.perf_counter() - start
    tokens = calibration_tokens(Tokenizer.from_gguf(path), "pydoc", args.calib_samples,
                                args.calib_len)
    rss_loaded = peak_rss_gib()
    timer = StageTimer()
    driver.BlockCalibration.statistics = timer.wrap("hessians (capture pass)",
                                                    driver.BlockCalibration.statistics)
    driver.block_forward = timer.wrap("propagate (quantized forward)", driver.block_forward)
    gptq.prepare_hessian = timer.wrap("cholesky", gptq.prepare_hessian)
    gptq.gptq_quantize_weight = timer.wrap("column loops", gptq.gptq_quantize_weight)
    start = time.perf_counter()
    result = gptq.gptq_quantize(model, tokens, args.weights, act_order=args.act_order,
                                batch_size=args.batch_size, progress=sys.stderr.isatty())
    total = time.perf_counter() - start
    info = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs",
        "jax": jax.__version__,
        "weights": args.weights,
        "calibration": f"{args.calib_samples} x {args.calib_len}",
        "load_model_s": round(load_s, 1),
        "gptq_s": round(total, 1),
        "stages_s": {k: round(v, 1) for k, v in timer.seconds.items()},
        "peak_rss_gib_after_load": round(rss_loaded, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "bits_per_weight": round(result.bits_per_weight, 4),
        "mean_output_rel_error": float(np.mean([e.report["output_rel_error"]
                                                for e in result.linears.values()])),
    }
    print(json.dumps(info) if args.json else json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
