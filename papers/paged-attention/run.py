"""PagedAttention memory claims: KV utilization and sequences served at once in a fixed budget, paged vs
contiguous reservations, simulated on request mixes and measured with the real BatchedGenerator (a small
random Llama); bytes per token per SmolLM2 KV layout. Writes results.json; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from flax import nnx

HERE = Path(__file__).resolve().parent

from lowbit.decode.engine import BatchedGenerator, Request
from lowbit.kvcache.layout import parse_layout
from lowbit.kvcache.memory import SCHEMES, simulate_serving, synthetic_requests
from lowbit.models.llama import Llama, LlamaConfig

MIXES = {  # name -> (prompt mean, output mean): vLLM's ShareGPT and Alpaca averages
    "sharegpt-like": (161.0, 338.0),
    "alpaca-like": (19.3, 58.5),
}


def simulation(args) -> dict:
    out = {}
    for mix, (prompt_mean, output_mean) in MIXES.items():
        requests = synthetic_requests(args.requests, seed=0, max_len=args.max_len,
                                      prompt_mean=prompt_mean, output_mean=output_mean)
        lengths = np.array([p + o for p, o in requests])
        out[mix] = {"mean_prompt": float(np.mean([p for p, _ in requests])),
                    "mean_output": float(np.mean([o for _, o in requests])), "schemes": {}}
        for scheme in SCHEMES:
            report = simulate_serving(requests, args.budget, scheme=scheme, max_len=args.max_len,
                                      max_running=args.max_running)
            out[mix]["schemes"][scheme] = report.__dict__
        page = 16
        paged_slots = np.ceil(lengths / page) * page
        out[mix]["static_fit"] = {  # sequences at their final length that fit in the budget at once
            "contiguous-max": args.budget // args.max_len,
            "contiguous-oracle": int(np.searchsorted(np.cumsum(lengths), args.budget, side="right")),
            "paged": int(np.searchsorted(np.cumsum(paged_slots), args.budget, side="right")),
        }
    return out


def engine_measurement(args) -> dict:
    """The real generator on a scaled-down mix: measured utilization and batch size."""
    config = LlamaConfig.tiny(max_seq_len=512)
    model = Llama(config, rngs=nnx.Rngs(0))
    mix = synthetic_requests(48, seed=1, max_len=256, prompt_mean=40.0, output_mean=60.0)
    rng = np.random.default_rng(0)
    requests = [Request(rng.integers(1, config.vocab_size, p).tolist(), o) for p, o in mix]
    budget_pages = 6 * 256 // 16  # room for six max-length sequences
    out = {}
    for name, options in (("paged", dict(num_pages=budget_pages, slots=32)),
                          ("contiguous-max", dict(contiguous=True, slots=6))):
        t0 = time.time()
        generator = BatchedGenerator(model, "f32", max_len=256, share_prefixes=False, **options)
        generator.generate(requests)
        s = generator.stats
        out[name] = {"mean_utilization": s.mean_utilization, "mean_batch": s.mean_batch,
                     "decode_steps": s.decode_steps, "preemptions": s.preemptions,
                     "budget_tokens": budget_pages * 16, "seconds": round(time.time() - t0, 1)}
        print(f"engine {name}: {out[name]}", flush=True)
    return out


def byte_budget(args) -> dict:
    config = LlamaConfig.smollm2_135m()
    out = {}
    for name in ("f32", "bf16", "int8", "int4", "kivi4", "kivi2"):
        layout = parse_layout(name)
        per_token = layout.bytes_per_token(config.n_kv_heads, config.head_dim) * config.n_layers
        residual = layout.residual_bytes(config.n_kv_heads, config.head_dim) * config.n_layers
        budget = args.byte_budget_mib * 2**20
        seq_bytes = args.seq_len * per_token + residual
        out[name] = {"bytes_per_token_all_layers": per_token, "residual_bytes_per_sequence": residual,
                     "tokens_in_budget": int(budget // per_token),
                     f"sequences_of_{args.seq_len}_in_budget": int(budget // seq_bytes)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--budget", type=int, default=65536, help="KV budget in token slots")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--max-running", type=int, default=256, help="vLLM's max_num_seqs")
    parser.add_argument("--byte-budget-mib", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    results = {"simulation": simulation(args), "byte_budget": byte_budget(args),
               "settings": vars(args)}
    if not args.skip_engine:
        results["engine"] = engine_measurement(args)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for mix, r in results["simulation"].items():
        print(f"\n{mix} (prompt {r['mean_prompt']:.0f}, output {r['mean_output']:.0f} tokens on average), "
              f"{args.requests} requests, budget {args.budget} tokens")
        print("| scheme | KV utilization | mean running | peak running | steps | preemptions |\n|---|---|---|---|---|---|")
        for scheme, s in r["schemes"].items():
            print(f"| {scheme} | {s['utilization']:.1%} | {s['mean_running']:.1f} | {s['peak_running']} | "
                  f"{s['steps']} | {s['preemptions']} |")
        print(f"static fit (sequences at final length): {r['static_fit']}")
    print("\n| KV layout | bytes/token (30 layers) | residual/seq | tokens in "
          f"{args.byte_budget_mib} MiB | sequences of {args.seq_len} |\n|---|---|---|---|---|")
    for name, r in results["byte_budget"].items():
        print(f"| {name} | {r['bytes_per_token_all_layers']:.0f} | {r['residual_bytes_per_sequence']} | "
              f"{r['tokens_in_budget']} | {r[f'sequences_of_{args.seq_len}_in_budget']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
