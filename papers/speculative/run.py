"""Speculative decoding on SmolLM2-135M: per target runtime, draft and gamma (fixed or adaptive),
acceptance alpha, tokens per target pass against (1 - alpha^(gamma+1)) / (1 - alpha), cost ratio c
and the greedy wall-clock speed-up against Leviathan et al.'s prediction; interleaved, medians."""

import argparse
import json
import os
import statistics
import time

import jax.numpy as jnp
import numpy as np

from lowbit import checkpoint
from lowbit.cli.generate import load_draft
from lowbit.decode import SpeculativeDecoder, expected_tokens_per_call, generate, predicted_speedup
from lowbit.decode.compilation import enable_compilation_cache
from lowbit.decode.engine import prompt_bucket
from lowbit.decode.speculative import _draft, _prefill

PROMPTS = [
    "The history of the city of Paris begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "The three most important rules for writing clear technical documentation are",
]


def plain_greedy(model, ids, tokens):
    """`model` alone, one token per jitted decode step through the same compiled steps and f32 cache
    as the speculative decoder. Returns (tokens, seconds per decode step)."""
    decoder = SpeculativeDecoder(model, model, 1)
    cache = decoder._cache(model, -(-(len(ids) + tokens + 1) // 128) * 128)
    padded = np.zeros(prompt_bucket(len(ids)), np.int32)
    padded[:len(ids)] = ids
    warp = (jnp.float32(0), jnp.int32(0), jnp.float32(1))
    graph, params = decoder.target_graph, decoder.target_params
    table = jnp.asarray(cache.block_tables()[0])
    token, cache.state = _prefill(graph, params, cache.state, cache.spec, jnp.asarray(padded), jnp.int32(len(ids)),
                                  table, warp, True)
    out = [int(token)]
    start = time.perf_counter()
    for position in range(len(ids), len(ids) + tokens - 1):
        new, _, _, cache.state = _draft(graph, params, cache.state, cache.spec, jnp.asarray([out[-1]], jnp.int32),
                                        jnp.int32(position), table, warp, None, jnp.float32(0), 1, True)
        out.append(int(new[0]))
    return np.asarray(out, np.int32), (time.perf_counter() - start) / (tokens - 1)


def generate_decode_seconds(model, ids, tokens):
    """Seconds of `lowbit.decode.generate`'s decoding of the tokens - 1 tokens after the first (up to
    16 steps per dispatch), from its own "first_token" and "end" stamps (the prefill outside, as the
    speculative decoder's time is taken); compiled beforehand."""
    stamps: dict = {}
    generate(model, ids, tokens, timings=stamps)
    return stamps["end"] - stamps["first_token"]


def make_draft(spec, target, tokenizer):
    """A draft from its name: rtn:SPEC, layers:N or a model (as `lowbit generate --draft`), with
    suffixes +a8 (int8 activations) and +h8 (a Q8_0 embedding and tied head of the draft's own)."""
    name, *suffixes = spec.split("+")
    if set(suffixes) - {"a8", "h8"}:
        raise ValueError(f"draft {spec!r}: the suffixes are +a8 (int8 activations) and +h8 (Q8_0 head)")
    return load_draft(name, target, tokenizer, activations="int8" if "a8" in suffixes else "f32",
                      embed="q8_0" if "h8" in suffixes else "keep")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="dequant,packed", help="target runtimes: dequant (f32), packed (GGUF)")
    parser.add_argument("--drafts", default="rtn:int4:g64,rtn:int2:g64")
    parser.add_argument("--gammas", default="1,2,3,4,6")
    parser.add_argument("--adaptive", default="", help="confidence thresholds, each at the largest gamma")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", default="papers/speculative/table.jsonl")
    args = parser.parse_args()
    enable_compilation_cache()
    gammas = [int(g) for g in args.gammas.split(",")]
    settings = [(g, 0.0) for g in gammas] + [(max(gammas), float(t)) for t in args.adaptive.split(",") if t]
    for runtime in args.targets.split(","):
        model, tokenizer = checkpoint.load_model_and_tokenizer(args.model, runtime)
        prompts = [tokenizer.encode(p) for p in PROMPTS[:args.prompts]]
        for spec in args.drafts.split(","):
            draft = make_draft(spec, model, tokenizer)
            decoders = {s: SpeculativeDecoder(model, draft, s[0], confidence_threshold=s[1]) for s in settings}
            plain_greedy(model, prompts[0], 4)
            plain_greedy(draft, prompts[0], 4)
            for ids in prompts:
                generate_decode_seconds(model, ids, args.tokens)
            for ids in prompts:  # compile every executable once (each prompt meets its own drafted counts)
                for decoder in decoders.values():
                    decoder.generate(ids, args.tokens)
            ratios = []
            for ids in prompts:
                ratios.append(plain_greedy(draft, ids, args.tokens)[1] / plain_greedy(model, ids, args.tokens)[1])
            cost = statistics.median(ratios)
            for (gamma, threshold), decoder in decoders.items():
                plain_s, spec_s, speedups, loads, generate_s = [], [], [], [], []
                accepted = tested = calls = verified = drafted = 0
                exact = True
                for ids in prompts:  # plain target, generate and speculative, interleaved per prompt
                    reference, per_token = plain_greedy(model, ids, args.tokens)
                    plain = per_token * (args.tokens - 1)
                    generate_s.append(generate_decode_seconds(model, ids, args.tokens))
                    out = decoder.generate(ids, args.tokens)
                    s = decoder.stats
                    spec_time = s.seconds - s.prefill_seconds
                    exact &= bool(np.array_equal(out, reference))
                    accepted, tested, drafted = accepted + s.accepted, tested + s.tested, drafted + s.drafted
                    calls, verified = calls + s.target_calls, verified + s.verified_tokens
                    plain_s.append(plain)
                    spec_s.append(spec_time)
                    speedups.append(plain / spec_time)
                    loads.append(os.getloadavg()[0])
                alpha = accepted / tested
                row = {"target": "f32" if runtime == "dequant" else "gguf-q4_1", "draft": spec, "gamma": gamma,
                       "adaptive_threshold": threshold, "mean_drafted": round(drafted / calls, 3),
                       "alpha": round(alpha, 4), "tokens_per_call": round(verified / calls, 3),
                       "formula_tokens_per_call": round(expected_tokens_per_call(alpha, gamma), 3),
                       "cost_ratio_c": round(cost, 3), "speedup_vs_plain_loop_median": round(statistics.median(speedups), 3),
                       "predicted_speedup": round(predicted_speedup(alpha, gamma, cost), 3),
                       "plain_loop_s_median": round(statistics.median(plain_s), 3),
                       "generate_s_median": round(statistics.median(generate_s), 3),
                       "speedup_vs_generate_median": round(statistics.median(
                           g / t for g, t in zip(generate_s, spec_s)), 3),
                       "speculative_s_median": round(statistics.median(spec_s), 3),
                       "greedy_identical": exact, "prompts": len(prompts), "tokens": args.tokens,
                       "loadavg": round(statistics.mean(loads), 2),
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                print(json.dumps(row), flush=True)
                with open(args.out, "a", encoding="utf-8") as f:  # each row as it comes: a long run can stop
                    f.write(json.dumps(row) + "\n")
            del draft, decoders
        del model


if __name__ == "__main__":
    main()
