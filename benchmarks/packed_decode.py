"""Whole-model greedy decode on CPU: SmolLM2 with f32 weights vs its linears frozen to packed int4:g64
(lowbit.nn.freeze -> PackedLinear -> packed_matmul, impl="auto": the native CPU kernel)."""

from __future__ import annotations

import argparse
import datetime
import os
import time

import numpy as np

from lowbit.decode import generate
from lowbit.models.loader import load_gguf_model
from lowbit.models.registry import fetch
from lowbit.nn.packed_linear import freeze
from lowbit.nn.rules import preset_rules, quantize_model


def tokens_per_second(model, prompt, new_tokens: int, repeats: int) -> tuple[float, np.ndarray]:
    """Decode rate from the difference of a short and a long generation (prefill and compile cancel)."""
    generate(model, prompt, new_tokens)  # compile
    short, long = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, prompt, 1)
        short.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = generate(model, prompt, new_tokens)
        long.append(time.perf_counter() - start)
    return (new_tokens - 1) / (min(long) - min(short)), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="int4-g64", help="weight preset of the frozen model")
    args = parser.parse_args(argv)
    model, _ = load_gguf_model(fetch("smollm2-135m"))
    prompt = np.array([1, 504, 3458, 282, 4649, 314, 253, 1345], np.int32)
    f32_rate, f32_out = tokens_per_second(model, prompt, args.new_tokens, args.repeats)
    quantize_model(model, preset_rules(args.preset))
    fake_quant_out = generate(model, prompt, args.new_tokens)  # the same weights, dequantized by XLA
    summary = freeze(model)
    packed_rate, packed_out = tokens_per_second(model, prompt, args.new_tokens, args.repeats)
    agree = float(np.mean(np.asarray(fake_quant_out) == np.asarray(packed_out)))
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load {os.getloadavg()[0]:.1f}; "
          f"frozen: {summary}")
    print(f"f32 decode {f32_rate:.1f} tok/s; {args.preset} packed decode {packed_rate:.1f} tok/s "
          f"({packed_rate / f32_rate:.2f}x); greedy tokens equal to the unfrozen {args.preset} model's: {agree:.0%}")


if __name__ == "__main__":
    main()
