"""Decode attention step time against the filled length at a fixed table width (2048 positions),
one layer of SmolLM2-135M's attention shape (9 query heads over 3 KV heads of 64), XLA path on CPU,
for f32, int8, int4 and KIVI-2 caches. Prints a Markdown table of milliseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.kvcache.attention import decode_layer
from lowbit.kvcache.cache import PagedKVCache
from lowbit.models.llama import LlamaConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layouts", default="f32,int8,int4,kivi2")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--filled", default="128,256,512,1024,2048")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    heads, kv_heads, head_dim = 9, 3, 64
    filled = [int(f) for f in args.filled.split(",")]
    rows = []
    for name in args.layouts.split(","):
        cache = PagedKVCache(LlamaConfig.tiny(n_layers=1, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                                              d_model=heads * head_dim, max_seq_len=args.width),
                             name, slots=1, max_len=args.width)
        slot = cache.open()
        cache.reserve(slot, args.width)
        tables = jnp.asarray(cache.block_tables())
        spec = cache.spec
        step = jax.jit(lambda state, q, k, v, pos: decode_layer(state, spec, 0, q, k, v, pos, jnp.ones(1, bool),
                                                                  tables)[0])
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((1, heads, head_dim)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((1, kv_heads, head_dim)), jnp.float32)
        row = {"layout": name, "kernel_api": spec.kernel_compatible}
        for n in filled:
            pos = jnp.asarray([n - 1], jnp.int32)
            step(cache.state, q, k, k, pos).block_until_ready()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step(cache.state, q, k, k, pos).block_until_ready()
                times.append(time.perf_counter() - start)
            row[n] = statistics.median(times) * 1e3
        rows.append(row)
    print(f"| layout (XLA path, table width {args.width}) | " + " | ".join(f"{n} filled" for n in filled) + " |")
    print("|---|" + "---|" * len(filled))
    for row in rows:
        print(f"| {row['layout']} | " + " | ".join(f"{row[n]:.2f} ms" for n in filled) + " |")
    return rows


if __name__ == "__main__":
    main()
