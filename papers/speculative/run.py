"""Speculative decoding on SmolLM2-135M: per draft and gamma, acceptance alpha, tokens per target
pass against (1 - alpha^(gamma+1)) / (1 - alpha), cost ratio c and the greedy wall-clock speed-up
against Leviathan et al.'s prediction; baseline and speculative runs interleaved, medians."""

import argparse
import json
import os
import statistics
import time

import jax.numpy as jnp
import numpy as np

from lowbit import checkpoint
from lowbit.decode import SpeculativeDecoder, expected_tokens_per_call, generate, layer_draft, predicted_speedup
from lowbit.decode.engine import prompt_bucket
from lowbit.decode.speculative import _draft, _prefill

PROMPTS = [
    "The history of the city of Paris begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "The three most important rules for writing clear technical documentation are",
]


def decode_seconds(model, ids, tokens):
    stamps = {}
    generate(model, ids, tokens, timings=stamps)
    return (stamps["end"] - stamps["first_token"]) / (tokens - 1)


def plain_greedy(decoder, ids, tokens):
    """The target alone, one token per jitted decode step, through the same identity-keyed steps and
    cache as the speculative decoder (lowbit.decode.generate hashes the model's graphdef per step)."""
    cache = decoder._cache(decoder.target, -(-(len(ids) + tokens + 1) // 128) * 128)
    padded = np.zeros(prompt_bucket(len(ids)), np.int32)
    padded[:len(ids)] = ids
    warp = (jnp.float32(0), jnp.int32(0), jnp.float32(1))
    graph, params = decoder.target_graph, decoder.target_params
    table = jnp.asarray(cache.block_tables()[0])
    token, cache.state = _prefill(graph, params, cache.state, cache.spec, jnp.asarray(padded), jnp.int32(len(ids)),
                                  table, warp, True)
    out = [int(token)]
    for position in range(len(ids), len(ids) + tokens - 1):
        new, _, cache.state = _draft(graph, params, cache.state, cache.spec, jnp.int32(out[-1]), jnp.int32(position),
                                     table, warp, None, 1, True)
        out.append(int(new[0]))
    return np.asarray(out, np.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--drafts", default="layers:8,layers:12")
    parser.add_argument("--gammas", default="1,2,3,4")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", default="papers/speculative/table.jsonl")
    args = parser.parse_args()
    model, tokenizer = checkpoint.load_model_and_tokenizer(args.model)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:args.prompts]]
    gammas = [int(g) for g in args.gammas.split(",")]
    drafts = {}
    for spec in args.drafts.split(","):
        drafts[spec] = (layer_draft(model, int(spec.split(":")[1])) if spec.startswith("layers:")
                        else checkpoint.load_model_and_tokenizer(spec)[0])
    for ids in prompts:  # compile every executable once
        generate(model, ids, args.tokens)
        for spec, draft in drafts.items():
            generate(draft, ids, args.tokens)
            for gamma in gammas:
                SpeculativeDecoder(model, draft, gamma).generate(ids, args.tokens)
        plain_greedy(SpeculativeDecoder(model, model, 1), ids, args.tokens)
    rows = []
    for spec, draft in drafts.items():
        ratios = []
        for ids in prompts:  # draft and target per-token decode time, interleaved
            for _ in range(2):
                ratios.append(decode_seconds(draft, ids, args.tokens) / decode_seconds(model, ids, args.tokens))
        cost = statistics.median(ratios)
        for gamma in gammas:
            decoder = SpeculativeDecoder(model, draft, gamma)
            speedups, base_s, spec_s, plain_s, plain_speedups = [], [], [], [], []
            accepted = tested = calls = verified = 0
            exact = True
            for ids in prompts:
                start = time.perf_counter()
                reference = generate(model, ids, args.tokens)
                base = time.perf_counter() - start
                start = time.perf_counter()
                out = decoder.generate(ids, args.tokens)
                spec_time = time.perf_counter() - start
                start = time.perf_counter()
                plain = plain_greedy(decoder, ids, args.tokens)
                plain_s.append(time.perf_counter() - start)
                plain_speedups.append(plain_s[-1] / spec_time)
                exact &= bool(np.array_equal(out, reference)) and bool(np.array_equal(plain, reference))
                s = decoder.stats
                accepted, tested = accepted + s.accepted, tested + s.tested
                calls, verified = calls + s.target_calls, verified + s.verified_tokens
                speedups.append(base / spec_time)
                base_s.append(base)
                spec_s.append(spec_time)
            alpha = accepted / tested
            row = {"draft": spec, "gamma": gamma, "alpha": round(alpha, 4),
                   "tokens_per_call": round(verified / calls, 3),
                   "formula_tokens_per_call": round(expected_tokens_per_call(alpha, gamma), 3),
                   "cost_ratio_c": round(cost, 3), "speedup_median": round(statistics.median(speedups), 3),
                   "speedup_vs_plain_loop_median": round(statistics.median(plain_speedups), 3),
                   "plain_loop_s_median": round(statistics.median(plain_s), 3),
                   "predicted_speedup": round(predicted_speedup(alpha, gamma, cost), 3),
                   "baseline_s_median": round(statistics.median(base_s), 3),
                   "speculative_s_median": round(statistics.median(spec_s), 3),
                   "greedy_identical": exact, "prompts": len(prompts), "tokens": args.tokens,
                   "loadavg": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
