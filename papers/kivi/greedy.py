"""Greedy continuations of SmolLM2-135M with quantized KV caches against the f32 cache: 16 prompts
from the pydoc evaluation split served together from one paged pool. Writes greedy.json next to this
file and prints a Markdown table of exact-match and token agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

from lowbit.data.corpus import load_text, split_tokens
from lowbit.decode.engine import BatchedGenerator, Request
from lowbit.checkpoint import load_model_and_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--layouts", default="int8,int4,kivi4,kivi2")
    parser.add_argument("--out", default=str(HERE / "greedy.json"))
    args = parser.parse_args(argv)
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", runtime="dequant")
    evaluation = split_tokens(np.asarray(tokenizer.encode(load_text("pydoc")), np.int32))[1]
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(args.prompts):  # 65..128 tokens: one prefill bucket, one compilation
        length = int(rng.integers(65, 129))
        start = int(rng.integers(0, len(evaluation) - length))
        requests.append(Request(evaluation[start:start + length].tolist(), args.new))
    max_len = 128 + args.new
    outputs = {}
    for layout in ["f32"] + args.layouts.split(","):
        t0 = time.time()
        generator = BatchedGenerator(model, layout, slots=args.prompts, max_len=max_len)
        outputs[layout] = [c.tokens for c in generator.generate(requests)]
        print(f"{layout}: {time.time() - t0:.0f} s", flush=True)
    reference = outputs["f32"]
    table = {}
    for layout, outs in outputs.items():
        if layout == "f32":
            continue
        exact = sum(a == b for a, b in zip(outs, reference))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, reference)]
        same = np.mean([np.mean(np.asarray(a) == np.asarray(b)) for a, b in zip(outs, reference)])
        table[layout] = {"identical": exact, "prompts": len(reference), "mean_common_prefix": float(np.mean(prefix)),
                         "position_agreement": float(same)}
    Path(args.out).write_text(json.dumps({"new_tokens": args.new, "table": table, "outputs": outputs}, indent=1))
    print(f"\n| cache | identical continuations ({args.new} tokens) | mean tokens before the first difference | "
          "same token at same position |\n|---|---|---|---|")
    for layout, r in table.items():
        print(f"| {layout} | {r['identical']}/{r['prompts']} | {r['mean_common_prefix']:.1f} | "
              f"{r['position_agreement']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
