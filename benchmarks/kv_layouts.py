"""Choose the default int8 KV layout on SmolLM2-135M: for each candidate, bytes per token, the
perplexity change against the float cache (teacher-forced, every position after the first of each
window) and greedy agreement with the float cache on held-apart prompts. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lowbit.data.corpus import evaluation_tokens, token_windows
from lowbit.decode.compilation import enable_compilation_cache
from lowbit.decode.engine import generate_batch
from lowbit.decode.quality import cache_quality
from lowbit.kvcache.layout import parse_layout
from lowbit.models.loader import load_gguf_model
from lowbit.models.registry import resolve_model
from lowbit.models.tokenizer import Tokenizer


def prompts_from(tokens: np.ndarray, count: int, lengths: list[int], gap: int = 4096) -> list[list[int]]:
    """`count` prompts cut from the evaluation half at offsets gap apart, cycling through lengths."""
    return [tokens[i * gap:i * gap + lengths[i % len(lengths)]].tolist() for i in range(count)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layouts", default="int8,int8:g32,int8:g16,int8:g32:asym")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    path = resolve_model("smollm2-135m")
    model, _ = load_gguf_model(path)
    tokens = evaluation_tokens(Tokenizer.from_gguf(path))
    prompts = prompts_from(tokens, args.prompts, [514, 384, 256, 128])
    windows = token_windows(tokens[-args.windows * args.ctx:], args.ctx)  # apart from the prompts
    names = [n for n in args.layouts.split(",") if n]
    start = time.perf_counter()
    quality = cache_quality(model, windows, {name: (name, None) for name in names})
    max_len = max(len(p) for p in prompts) + args.new_tokens
    reference = generate_batch(model, prompts, args.new_tokens, layout="f32", slots=len(prompts),
                               max_len=max_len)
    config = model.config
    rows = []
    for name in names:
        got = generate_batch(model, prompts, args.new_tokens, layout=name, slots=len(prompts),
                             max_len=max_len)
        first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                      for x, y in zip(got, reference)]
        q = quality[name]
        rows.append({"layout": name,
                     "bytes_per_token_per_layer": parse_layout(name).bytes_per_token(
                         config.n_kv_heads, config.head_dim),
                     "ppl": round(q.ppl, 4), "ppl_f32_cache": round(q.ref_ppl, 4),
                     "ppl_change_pct": round(100 * (q.ppl / q.ref_ppl - 1), 3), "kl": q.kl,
                     "prompts_all_equal": sum(d == args.new_tokens for d in first_diff),
                     "first_difference": first_diff})
    print("| layout | bytes/token/layer | ppl (f32 cache) | ppl change | KL | prompts with all "
          f"{args.new_tokens} greedy tokens equal | first differing token per prompt |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['bytes_per_token_per_layer']:.0f} | {r['ppl']} ({r['ppl_f32_cache']}) | "
              f"{r['ppl_change_pct']:+.3f}% | {r['kl']:.2e} | {r['prompts_all_equal']}/{len(prompts)} | "
              f"{r['first_difference']} |")
    print(f"\n{len(prompts)} prompts of {sorted({len(p) for p in prompts})} tokens, {args.new_tokens} greedy "
          f"tokens; perplexity on {args.windows} windows of {args.ctx} from the end of the pydoc evaluation "
          f"half; {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return {"rows": rows}


if __name__ == "__main__":
    main()
