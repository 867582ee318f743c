"""Benchmark QAT training: tokens/s of one training step of the same Llama model in fp32 and with
each fake-quantization preset, the ratio to fp32 (target: at most 1.5x), and peak step memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp


from lowbit.train import TrainConfig, Trainer, corpus_tokens
from lowbit.train.loop import _train_step, optimizer_key

PRESETS = ["fp32", "ternary", "binary", "int4-lsq", "w4a8-lsq", "w4a4-lsq", "int4-g64", "w8a8"]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def step_memory(trainer: Trainer) -> int:
    """Bytes XLA reserves for one compiled training step: arguments + outputs + temporaries,
    less the donated (aliased) buffers."""
    args = (trainer.graphdef, optimizer_key(trainer.config.train), trainer.params, trainer.rest,
            trainer.opt_state, trainer._put(trainer._batch(0)), jnp.float32(1e-3))
    stats = _train_step.lower(*args).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def measure(args) -> dict:
    tokens = corpus_tokens("pydoc", "byte", 0.1)
    trainers = {}
    for preset in args.presets:
        config = TrainConfig.from_dict({
            "model": {"d_model": args.width, "n_layers": args.layers, "n_heads": max(1, args.width // 32)},
            "train": {"steps": 10_000, "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_interval": 0},
            "quant": {"preset": preset}})
        trainer = Trainer(config, tokens=tokens)
        for _ in range(2):  # compile and warm up
            trainer.train_step()
        trainers[preset] = trainer
    samples = {p: [] for p in args.presets}
    for _ in range(args.rounds):  # interleaved, so that load changes on a shared machine hit all alike
        for preset, trainer in trainers.items():
            jax.block_until_ready(trainer.params)
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            jax.block_until_ready(trainer.params)
            samples[preset].append((time.perf_counter() - start) / args.steps)
    rows = []
    base = statistics.median(samples[args.presets[0]])
    for preset, trainer in trainers.items():
        step = statistics.median(samples[preset])
        rows.append({"preset": preset, "step_ms": 1000 * step,
                     "tokens_per_s": args.batch_size * args.seq_len / step,
                     "vs_fp32": step / base, "step_memory_mib": step_memory(trainer) / 2**20})
    return {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "write")},
            "jax": jax.__version__, "backend": jax.default_backend(), "machine": platform.machine(),
            "date": datetime.date.today().isoformat()}


def markdown(result: dict, machine: str) -> str:
    s = result["settings"]
    lines = [
        "## QAT",
        "",
        f"{result['date']}, {machine}; jax {result['jax']} ({result['backend']}). Command: "
        f"`python benchmarks/qat.py --width {s['width']} --layers {s['layers']} --batch-size {s['batch_size']} "
        f"--seq-len {s['seq_len']} --rounds {s['rounds']} --steps {s['steps']}`.",
        f"One AdamW training step of a byte-level Llama (d_model {s['width']}, {s['layers']} blocks, "
        f"batch {s['batch_size']} x {s['seq_len']} tokens), median of {s['rounds']} interleaved rounds of "
        f"{s['steps']} steps. Step memory: XLA's arguments + outputs + temporaries of the compiled step, "
        "less donated buffers. Target: fake quantization costs at most 1.5x the fp32 step.",
        "",
        "| preset | step (ms) | tokens/s | vs fp32 | step memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['preset']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['vs_fp32']:.2f}x | "
                     f"{r['step_memory_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the '## QAT' section of RESULTS.md, leaving the others as they are."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## QAT\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--machine", default="2-core x86_64 CPU, shared with other jobs during the run")
    parser.add_argument("--write", action="store_true", help="update the '## QAT' section of benchmarks/RESULTS.md")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.presets[0] != "fp32":
        args.presets = ["fp32"] + [p for p in args.presets if p != "fp32"]
    result = measure(args)
    text = markdown(result, args.machine)
    print(json.dumps(result) if args.json else text)
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
