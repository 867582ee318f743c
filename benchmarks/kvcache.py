"""Benchmark KV caches on SmolLM2-135M: decode tokens/s of one sequence for each cache layout at a
given context, and total tokens/s of batched generation with 1, 4 and 16 concurrent requests of
mixed lengths from one paged pool. `--help` lists the options; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.data.corpus import load_text
from lowbit.decode.engine import BatchedGenerator, Request
from lowbit.decode.step import decode_step
from lowbit.kvcache.cache import PagedKVCache
from lowbit.models.loader import load_gguf_model
from lowbit.models.registry import resolve_model
from lowbit.models.tokenizer import Tokenizer


class _DecodeRun:
    """One sequence holding `context` tokens in a cache sized to the context (the XLA path reads the
    whole block table), stepped one token at a time; contents do not change the cost, so no prefill."""

    def __init__(self, model, layout: str, context: int, steps: int):
        self.cache = PagedKVCache(model.config, layout, slots=1, max_len=context + steps + 1)
        self.slot = self.cache.open()
        self.cache.reserve(self.slot, context)
        self.cache.advance(self.slot, context)
        self.graphdef, self.params = nnx.split(model)
        self.key = jnp.stack([jax.random.key_data(jax.random.key(0))])
        self.token = jnp.zeros(1, jnp.int32)

    def step(self) -> float:
        cache = self.cache
        length = cache.length(self.slot)
        cache.reserve(self.slot, length + 1)
        start = time.perf_counter()
        self.token, _, cache.state = decode_step(
            self.graphdef, self.params, cache.state, cache.spec, self.token,
            jnp.asarray([length], jnp.int32), jnp.ones(1, bool), jnp.asarray(cache.block_tables()),
            jnp.zeros(1), self.key, jnp.zeros(1, jnp.int32))
        self.token.block_until_ready()
        cache.advance(self.slot, length + 1)
        return time.perf_counter() - start


def decode_speeds(model, layouts: list[str], context: int, rounds: int, steps: int) -> list[dict]:
    """Median seconds per decode step for each layout, interleaved: every round runs `steps` steps
    of each layout in turn, so that a shared machine's load shifts hit all layouts alike."""
    runs, compile_s = {}, {}
    for layout in layouts:
        start = time.perf_counter()
        runs[layout] = _DecodeRun(model, layout, context, rounds * steps + 2)
        runs[layout].step()
        compile_s[layout] = time.perf_counter() - start
        runs[layout].step()
    samples = {layout: [] for layout in layouts}
    for _ in range(rounds):
        for layout in layouts:
            samples[layout].append(statistics.median(runs[layout].step() for _ in range(steps)))
    out = []
    for layout in layouts:
        step = statistics.median(samples[layout])
        out.append({"layout": layout, "context": context, "step_ms": 1000 * step, "tokens_per_s": 1 / step,
                    "compile_s": compile_s[layout],
                    "kv_bytes_per_token_per_layer": runs[layout].cache.memory().bytes_per_token})
    return out


def mixed_requests(tokens: np.ndarray, count: int, seed: int, new_range, prompt_range) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(*prompt_range))
        start = int(rng.integers(0, len(tokens) - length))
        out.append(Request(tokens[start:start + length].tolist(), int(rng.integers(*new_range))))
    return out


def batched_speed(model, layout: str, requests: list[Request], slots: int, max_len: int) -> dict:
    """Total generated tokens/s serving all requests with `slots` concurrent sequences (after a
    warm-up pass over the same prompt lengths that compiles every shape)."""
    generator = BatchedGenerator(model, layout, slots=slots, max_len=max_len, share_prefixes=False)
    generator.generate([Request(r.prompt, 2) for r in requests])  # compile prefill buckets + step
    generator.generate(requests)
    s = generator.stats
    return {"layout": layout, "slots": slots, "requests": len(requests), "tokens": s.generated_tokens,
            "seconds": s.seconds, "tokens_per_s": s.tokens_per_s, "mean_batch": s.mean_batch,
            "prefill_seconds": s.prefill_seconds, "decode_seconds": s.decode_seconds,
            "decode_tokens_per_s": s.decode_tokens_per_s,
            "decode_steps": s.decode_steps, "mean_kv_utilization": s.mean_utilization}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layouts", default="f32,bf16,int8,int4,kivi4,kivi2")
    parser.add_argument("--contexts", default="512,2048")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="decode steps per layout per round")
    parser.add_argument("--slots", default="1,4,16")
    parser.add_argument("--batched-layouts", default="f32,int8")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-batched", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    path = resolve_model("smollm2-135m")
    model, _ = load_gguf_model(path)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
               "backend": jax.default_backend(), "decode": [], "batched": []}
    if not args.skip_decode:
        for context in [int(c) for c in args.contexts.split(",")]:
            for r in decode_speeds(model, args.layouts.split(","), context, args.rounds, args.steps):
                results["decode"].append(r)
                print(f"decode {r['layout']:6s} ctx {context:5d}: {r['step_ms']:.1f} ms/step "
                      f"({r['tokens_per_s']:.1f} tok/s), compile {r['compile_s']:.0f} s", flush=True)
    if not args.skip_batched:
        tokens = np.asarray(Tokenizer.from_gguf(path).encode(load_text("pydoc")[:200000]), np.int32)
        requests = mixed_requests(tokens, args.requests, 0, (16, 49), (16, 257))
        max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
        for layout in args.batched_layouts.split(","):
            for slots in [int(s) for s in args.slots.split(",")]:
                r = batched_speed(model, layout, requests, slots, max_len)
                results["batched"].append(r)
                print(f"batched {layout:5s} slots {slots:2d}: {r['tokens_per_s']:.1f} tok/s total "
                      f"({r['tokens']} tokens in {r['seconds']:.1f} s, prefill {r['prefill_seconds']:.1f} s; "
                      f"decode phase {r['decode_tokens_per_s']:.1f} tok/s, mean batch {r['mean_batch']:.1f})",
                      flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if results["decode"]:
        contexts = sorted({r["context"] for r in results["decode"]})
        print("\n| cache | bytes/token/layer | " + " | ".join(f"ctx {c}: ms/step, tok/s" for c in contexts)
              + " | vs f32 at " + str(contexts[-1]) + " |\n|---|---|" + "---|" * (len(contexts) + 1))
        by = {(r["layout"], r["context"]): r for r in results["decode"]}
        base = by.get(("f32", contexts[-1]))
        for layout in dict.fromkeys(r["layout"] for r in results["decode"]):
            cells = [f"{by[(layout, c)]['step_ms']:.1f}, {by[(layout, c)]['tokens_per_s']:.1f}" for c in contexts]
            ratio = by[(layout, contexts[-1])]["step_ms"] / base["step_ms"] if base else float("nan")
            print(f"| {layout} | {by[(layout, contexts[0])]['kv_bytes_per_token_per_layer']:.0f} | "
                  + " | ".join(cells) + f" | {ratio:.2f}x |")
    if results["batched"]:
        print("\n| cache | concurrent requests | total tok/s | seconds (prefill) | decode-phase tok/s | "
              "mean batch |\n|---|---|---|---|---|---|")
        for r in results["batched"]:
            print(f"| {r['layout']} | {r['slots']} | {r['tokens_per_s']:.1f} | {r['seconds']:.1f} "
                  f"({r['prefill_seconds']:.1f}) | {r['decode_tokens_per_s']:.1f} | {r['mean_batch']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
