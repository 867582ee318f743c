"""StreamingLLM on SmolLM2-135M: a C-token KV cache on 2048-token pydoc windows; window attention, sinks +
window (positions re-assigned) and sliding window with re-computation, scored against the full cache on
positions beyond C. Writes results.json next to this file and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

from lowbit.data.corpus import load_text, split_tokens, token_windows
from lowbit.decode.quality import compare_hidden, final_hidden, recompute_logits, score_logits, summarize
from lowbit.checkpoint import load_model_and_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--cache", type=int, default=256, help="KV cache size C in tokens")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--stride", type=int, default=32,
                        help="score every stride-th position beyond C for the re-computation baseline")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", runtime="dequant")
    tokens = np.asarray(tokenizer.encode(load_text("pydoc")), np.int32)
    windows = token_windows(split_tokens(tokens)[1], args.ctx, args.windows)
    c = args.cache
    configs = {
        f"window only ({c})": f"window:{c}",
        f"sinks {args.sinks} + window {c - args.sinks}": f"sinks:{args.sinks},window:{c - args.sinks}",
        f"sinks 1 + window {c - 1}": f"sinks:1,window:{c - 1}",
    }
    sampled = np.arange(c, args.ctx - 1, args.stride)  # query positions scored by every method
    all_weight = np.zeros((1, args.ctx - 1), np.float32)
    all_weight[0, c:] = 1.0
    sub_weight = np.zeros((1, args.ctx - 1), np.float32)
    sub_weight[0, sampled] = 1.0
    totals = {name: [np.zeros(5), np.zeros(5)] for name in configs}
    totals["re-computation"] = [None, np.zeros(5)]
    start = time.time()
    for w in range(len(windows)):
        row = windows[w:w + 1]
        ref = final_hidden(model, row)
        for name, policy in configs.items():
            t0 = time.time()
            hidden = final_hidden(model, row, "f32", policy)
            totals[name][0] += compare_hidden(model, hidden, ref, row, all_weight)
            totals[name][1] += compare_hidden(model, hidden, ref, row, sub_weight)
            print(f"window {w} {name}: {time.time() - t0:.0f} s", flush=True)
        t0 = time.time()
        recomputed = recompute_logits(model, row[0], c, sampled)
        ref_logits = np.asarray(model.head(ref[:, sampled]))[0]
        totals["re-computation"][1] += score_logits(recomputed, ref_logits, row[0, sampled + 1])
        print(f"window {w} re-computation ({len(sampled)} positions): {time.time() - t0:.0f} s", flush=True)
    results = {"ctx": args.ctx, "windows": args.windows, "cache": c, "stride": args.stride,
               "seconds": round(time.time() - start, 1), "methods": {}}
    for name, (every, sub) in totals.items():
        results["methods"][name] = {
            "beyond_cache": None if every is None else summarize(every).__dict__,
            "sampled": summarize(sub).__dict__}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n| method (cache {c}) | ppl, positions >= {c} | ppl, sampled | KL vs full cache, sampled | "
          "top-1, sampled |\n|---|---|---|---|---|")
    for name, r in results["methods"].items():
        every = "n/a" if r["beyond_cache"] is None else f"{r['beyond_cache']['ppl']:.3f}"
        s = r["sampled"]
        print(f"| {name} | {every} | {s['ppl']:.3f} | {s['kl']:.4f} | {s['top1']:.3f} |")
    full = results["methods"][next(iter(configs))]["sampled"]["ref_ppl"]
    print(f"| full cache (dense) | {results['methods'][next(iter(configs))]['beyond_cache']['ref_ppl']:.3f} "
          f"| {full:.3f} | 0 | 1 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
