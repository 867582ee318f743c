"""Whole-model greedy decode on CPU: SmolLM2 with f32 weights vs its linears frozen to packed int4:g64
(lowbit.nn.freeze -> PackedLinear -> packed_matmul, impl="auto": the native CPU kernel), or, with
--checkpoint, vs packed checkpoints loaded side by side in one process and timed in interleaved rounds;
--context-profile times the decode step against the filled length and the cache's max_len."""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import numpy as np

from lowbit.decode import generate
from lowbit.models.loader import load_gguf_model
from lowbit.models.registry import fetch
from lowbit.nn.packed_linear import freeze
from lowbit.nn.rules import preset_rules, quantize_model

PROMPT = np.array([1, 504, 3458, 282, 4649, 314, 253, 1345], np.int32)


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


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def _prompts(path, long_len: int) -> dict[str, np.ndarray]:
    """PROMPT (8 tokens) and the first long_len tokens of the pydoc evaluation split."""
    from lowbit.data.corpus import load_text, split_tokens
    from lowbit.models.tokenizer import Tokenizer

    ids = np.asarray(Tokenizer.from_gguf(path).encode(load_text()), np.int32)
    return {"short": PROMPT, "long": split_tokens(ids)[1][:long_len]}


def compare_checkpoints(checkpoints: dict[str, str], new_tokens: int, rounds: int, long_len: int) -> None:
    """f32 and every checkpoint loaded in this process; each round times every model once per prompt
    (in a rotated order), so load changes hit all of them alike; prints medians over the rounds."""
    import lowbit

    path = fetch("smollm2-135m")
    models, rss = {}, {}
    before = _rss_mib()
    models["f32"], _ = load_gguf_model(path)
    rss["f32"] = _rss_mib() - before
    for name, directory in checkpoints.items():
        before = _rss_mib()
        models[name] = lowbit.load(directory)
        rss[name] = _rss_mib() - before
    prompts = _prompts(path, long_len)
    rates = {(name, kind): [] for name in models for kind in prompts}
    for model in models.values():
        for prompt in prompts.values():
            tokens_per_second(model, prompt, new_tokens, 1)  # compile both lengths
    loads = [os.getloadavg()[0]]
    names = list(models)
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            for kind, prompt in prompts.items():
                rates[(name, kind)].append(tokens_per_second(models[name], prompt, new_tokens, 1)[0])
        loads.append(os.getloadavg()[0])
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, 1-minute load "
          f"{min(loads):.1f}-{max(loads):.1f}; {rounds} interleaved rounds, {new_tokens} new tokens, prompts of "
          f"{len(PROMPT)} and {long_len} tokens; medians (tok/s) and ratios to f32\n")
    print("| model | RSS added by its load (MiB) | decode, short prompt | / f32 | decode, long prompt | / f32 | long / short |")
    print("|---|---|---|---|---|---|---|")
    med = {key: statistics.median(values) for key, values in rates.items()}
    for name in names:
        short, long = med[(name, "short")], med[(name, "long")]
        print(f"| {name} | {rss[name]:.0f} | {short:.1f} | {short / med[('f32', 'short')]:.2f}x | {long:.1f} | "
              f"{long / med[('f32', 'long')]:.2f}x | {long / short:.2f} |")


def context_profile(rounds: int) -> None:
    """Where a decode step's time goes as the context grows: the jitted decode step of SmolLM2's shape
    (random f32 weights, f32 contiguous cache of one sequence) at filled length x cache max_len, with the
    cache attention as it is and with a stub that reads no keys/values (the difference is the attention);
    every configuration once per round, medians and bests over the rounds (ms)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import lowbit.kvcache.attention as cache_attention
    from lowbit.decode.step import _decode_step
    from lowbit.kvcache.cache import DenseKVCache
    from lowbit.models.llama import Llama, LlamaConfig

    config = LlamaConfig.smollm2_135m()
    graphdef, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    real_attention = cache_attention.decode_attention
    cases = [(16, 128, True), (16, 640, True), (512, 640, True), (16, 2048, True), (1536, 2048, True),
             (16, 640, False), (512, 640, False)]
    steps, caches = {}, {}
    for max_len in sorted({m for _, m, _ in cases}):
        for attention in (True, False):
            steps[(max_len, attention)] = jax.jit(_decode_step, static_argnames=("graphdef", "spec", "return_logits"),
                                                  donate_argnames=("cache_state",))
            caches[(max_len, attention)] = DenseKVCache(config, "f32", slots=1, max_len=max_len)

    def run(filled, max_len, attention):
        cache = caches[(max_len, attention)]
        cache_attention.decode_attention = real_attention if attention else (lambda q, *args, **kwargs: q)
        start = time.perf_counter()
        token, _, cache.state = steps[(max_len, attention)](
            graphdef, params, cache.state, cache.spec, jnp.zeros(1, jnp.int32), jnp.array([filled], jnp.int32),
            jnp.ones(1, bool), jnp.arange(cache.table_width, dtype=jnp.int32)[None], jnp.zeros(1, jnp.float32),
            jnp.zeros((1, *jax.random.key_data(jax.random.key(0)).shape), jnp.uint32), jnp.zeros(1, jnp.int32))
        jax.block_until_ready(token)
        cache_attention.decode_attention = real_attention
        return time.perf_counter() - start

    for case in cases:
        run(*case)  # compile
    times = {case: [] for case in cases}
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        for case in cases:
            times[case].append(run(*case) * 1e3)
        loads.append(os.getloadavg()[0])
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, 1-minute load "
          f"{min(loads):.1f}-{max(loads):.1f}; decode step of SmolLM2-135M's shape, {rounds} rounds\n")
    print("| filled positions | cache max_len | attention | median ms | best ms |")
    print("|---|---|---|---|---|")
    for (filled, max_len, attention), values in times.items():
        print(f"| {filled} | {max_len} | {'yes' if attention else 'stub (reads no K/V)'} | "
              f"{statistics.median(values):.1f} | {min(values):.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="int4-g64", help="weight preset of the frozen model")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="compare f32 with these checkpoints (lowbit quantize --out DIR) instead of --preset")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds with --checkpoint")
    parser.add_argument("--long", type=int, default=512, help="long prompt length with --checkpoint")
    parser.add_argument("--context-profile", action="store_true",
                        help="instead: time the decode step against filled length and cache max_len")
    args = parser.parse_args(argv)
    if args.context_profile:
        context_profile(args.rounds)
        return
    if args.checkpoint:
        pairs = [entry.partition("=") for entry in args.checkpoint]
        if any(not name or not directory or not os.path.isdir(directory) for name, _, directory in pairs):
            raise SystemExit(f"--checkpoint must be NAME=DIR with an existing DIR, got {args.checkpoint}")
        compare_checkpoints({name: directory for name, _, directory in pairs}, args.new_tokens, args.rounds,
                            args.long)
        return
    model, _ = load_gguf_model(fetch("smollm2-135m"))
    prompt = PROMPT
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
