"""KIVI on SmolLM2-135M: teacher-forced perplexity and KL against the exact KV cache for int8, int4,
plain 2-bit, KIVI-2/4 and their ablations (axes swapped; no residual window), on long windows of the
pydoc evaluation split. Writes results.json next to this file and prints a Markdown table.
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
from lowbit.decode.quality import compare_hidden, final_hidden, summarize, teacher_forced_decode_logits
from lowbit.kvcache.layout import parse_layout
from lowbit.checkpoint import load_model_and_tokenizer

CONFIGS = {  # name -> (layout string, what it is)
    "bf16": ("bf16", "bf16 storage"),
    "int8": ("int8", "int8, one symmetric scale per token and head"),
    "int4": ("int4", "int4 asym, per token, groups of 32 channels"),
    "int2": ("int2", "plain 2-bit: asym, per token, groups of 32 channels, no residual"),
    "kivi4": ("kivi4", "KIVI-4: K per channel (32 tokens), V per token (32 ch), R=128"),
    "kivi2": ("kivi2", "KIVI-2: K per channel (32 tokens), V per token (32 ch), R=128"),
    "kivi2-swap": ("kivi2:swap", "ablation: K per token, V per channel, R=128"),
    "kivi2-r0": ("kivi2:r0", "ablation: KIVI-2 without the residual window"),
    "kivi2-swap-r0": ("kivi2:swap:r0", "ablation: K per token, V per channel, no residual"),
    "kivi2-r32": ("kivi2:r32", "KIVI-2 with R=32"),
}


def corpus_windows(tokenizer, ctx: int, count: int) -> np.ndarray:
    tokens = np.asarray(tokenizer.encode(load_text("pydoc")), np.int32)
    _, evaluation = split_tokens(tokens)
    return token_windows(evaluation, ctx, count)


def check_decode(model, windows, layouts, length: int) -> dict:
    """The one-pass emulation against real token-by-token decoding on the first `length` tokens:
    logit differences, argmax agreement and the perplexity each way."""
    tokens = windows[:1, :length]
    out = {}
    for layout in layouts:
        decoded = teacher_forced_decode_logits(model, tokens, layout)[0, :-1]
        emulated = np.asarray(model.head(final_hidden(model, tokens, layout)))[0, :-1]
        diff = np.abs(decoded - emulated).max(-1)

        def ppl(logits):
            logits = logits - logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            return float(np.exp(-logp[np.arange(len(logp)), tokens[0, 1:]].mean()))

        out[layout] = {"tokens": length, "max_logit_diff": float(diff.max()),
                       "median_logit_diff": float(np.median(diff)),
                       "argmax_agreement": float((decoded.argmax(-1) == emulated.argmax(-1)).mean()),
                       "ppl_decoded": ppl(decoded), "ppl_emulated": ppl(emulated)}
        print(f"  decode check {layout}: {out[layout]}", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--check-decode", type=int, default=0,
                        help="also decode this many tokens one at a time and compare (0 = skip)")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]  # "" runs only --check-decode
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", runtime="dequant")
    config = model.config
    windows = corpus_windows(tokenizer, args.ctx, args.windows)
    results = {"ctx": args.ctx, "windows": args.windows, "model": "smollm2-135m", "configs": {}}
    start = time.time()
    references = [final_hidden(model, windows[w:w + 1]) for w in range(len(windows))]
    for name in names:
        t0 = time.time()
        layout = CONFIGS[name][0]
        totals = sum(compare_hidden(model, final_hidden(model, windows[w:w + 1], layout), references[w],
                                    windows[w:w + 1]) for w in range(len(windows)))
        quality = summarize(totals)
        bpt = parse_layout(layout).bytes_per_token(config.n_kv_heads, config.head_dim)
        results["configs"][name] = {"layout": layout, "description": CONFIGS[name][1],
                                    "bytes_per_token_per_layer": bpt, **quality.__dict__}
        print(f"{name:14s} ppl {quality.ppl:.4f} (exact {quality.ref_ppl:.4f}) kl {quality.kl:.5f} "
              f"top1 {quality.top1:.4f}  [{time.time() - t0:.0f} s]", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.check_decode:
        results["decode_check"] = check_decode(model, windows, ["int8", "kivi2:r32"], args.check_decode)
    results["seconds"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| cache | bytes/token/layer | ppl | vs exact | KL | top-1 |\n|---|---|---|---|---|---|")
    for name, r in results["configs"].items():
        print(f"| {name} | {r['bytes_per_token_per_layer']:.0f} | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / r['ref_ppl'] - 1):+.2f}% | {r['kl']:.4f} | {r['top1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
