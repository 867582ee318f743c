"""Bounded KV caches decoded token by token through the real cache on SmolLM2-135M (H2O depends on the
attention history): H2O heavy hitters + recent vs sinks + window vs window only at one cache size,
scored against the full cache on a pydoc window. Writes h2o.json next to this file.
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
from lowbit.decode.quality import score_logits, summarize, teacher_forced_decode_logits
from lowbit.checkpoint import load_model_and_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--cache", type=int, default=128)
    parser.add_argument("--out", default=str(HERE / "h2o.json"))
    args = parser.parse_args(argv)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", runtime="dequant")
    tokens = np.asarray(tokenizer.encode(load_text("pydoc")), np.int32)
    row = token_windows(split_tokens(tokens)[1], args.ctx, 1)
    c = args.cache
    policies = {"full cache": None, f"H2O {c // 2} heavy + {c // 2} recent": f"heavy:{c // 2},recent:{c // 2}",
                f"sinks 4 + window {c - 4}": f"sinks:4,window:{c - 4}", f"window only ({c})": f"window:{c}"}
    logits = {}
    for name, policy in policies.items():
        t0 = time.time()
        logits[name] = teacher_forced_decode_logits(model, row, "f32", policy, max_len=args.ctx)[0]
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    positions = np.arange(c, args.ctx - 1)
    reference = logits["full cache"][positions]
    results = {"ctx": args.ctx, "cache": c, "methods": {}}
    for name, values in logits.items():
        quality = summarize(score_logits(values[positions], reference, row[0, positions + 1]))
        results["methods"][name] = {"ppl": quality.ppl, "kl": quality.kl, "top1": quality.top1,
                                    "tokens": quality.tokens}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n| method (cache {c}, decoded token by token) | ppl, positions >= {c} | KL vs full | top-1 |\n"
          "|---|---|---|---|")
    for name, r in results["methods"].items():
        print(f"| {name} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
