"""Benchmark the lowbit kernels (packed low-bit matmul, int8 W8A8 matmul, paged decode attention).

Matmuls are timed next to a bf16 jnp.dot of the same shape; `--help` lists the options.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.kernels import decode_attention, int8_matmul, packed_matmul, quantize_pages
from lowbit.kernels.dispatch import resolve_impl

MATMUL_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536), (1536, 576), (576, 576)]  # (K, N)
BATCHES = [1, 8, 64]
CONTEXTS = [512, 2048, 8192]
FORMATS = ["int4:g128", "int4:g128:asym", "int2:g64", "ternary:g128", "binary:channel"]
QUICK_FORMATS = ["int4:g128", "ternary:g128"]


def _chained(fn, count: int):
    """One jitted program that calls fn `count` times; each call's first argument depends on the
    sum of the previous result (x + 0 * r), so XLA can neither hoist, merge nor slice the calls."""
    def run(x, *rest):
        def body(_, r):
            # The barrier also keeps work that reads only the weights from being hoisted out of the loop.
            x_in, rest_in, r = jax.lax.optimization_barrier((x, rest, r))
            y = fn(x_in + (r * 0).astype(x.dtype), *rest_in)
            return jnp.sum(y, dtype=jnp.float32)
        return jax.lax.fori_loop(0, count, body, jnp.float32(0))
    return jax.jit(run)


def time_call(fn, args, warmup: int, repeats: int, rounds: int = 5) -> float:
    """Seconds per call of fn(*args) on the device: a program of 1 + repeats chained calls less one
    of a single call (so JAX's dispatch and the host-device round trip, ~40 us a call on an H100
    host, are not counted), the median over `rounds` timings of each. Each call still carries the
    chain's small add and sum over x and y (a few us on a GPU: small next to a large GEMV)."""
    one, many = _chained(fn, 1), _chained(fn, 1 + repeats)
    for _ in range(max(warmup, 1)):
        jax.block_until_ready((one(*args), many(*args)))

    def seconds(program):
        start = time.perf_counter()
        jax.block_until_ready(program(*args))
        return time.perf_counter() - start

    single = statistics.median(seconds(one) for _ in range(rounds))
    chained = statistics.median(seconds(many) for _ in range(rounds))
    return max(chained - single, 1e-9) / repeats  # at least 1 ns: below that the clock cannot tell


def bench_read(args, records):
    """The device's read bandwidth (a sum over 256 MiB), the ceiling of a GEMV's GB/s."""
    a = jnp.ones((64 << 20,), jnp.float32)
    t = time_call(lambda a: a, (a,), args.warmup, args.repeats)  # the chained program sums it
    _emit(records, dict(op="read", format="256MiB f32 sum", impl="xla", m=1, k=0, n=1, flops=float(a.size),
                        seconds=t, bytes=_nbytes(a)))


def _nbytes(*arrays) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in arrays if a is not None)


@functools.partial(jax.jit, static_argnames=("spec", "ternary"))
def _quantize_pack(w, spec, ternary):
    return pack(quantize(w, spec), ternary=ternary)


def _fit_group(spec: str, k: int) -> str:
    """Halve a spec's group size until it divides K (SmolLM2's 576 takes g64, not g128)."""
    head, *rest = spec.split(":")
    out = []
    for token in rest:
        if token.startswith("g") and token[1:].isdigit():
            group = int(token[1:])
            while k % group:
                group //= 2
            token = f"g{group}"
        out.append(token)
    return ":".join([head, *out])


def bench_matmuls(args, impls, records):
    formats = QUICK_FORMATS if args.quick else FORMATS
    key = jax.random.PRNGKey(0)
    for k, n in MATMUL_SHAPES:
        w = jax.random.normal(key, (k, n), jnp.float32) * 0.02
        w_bf16 = w.astype(jnp.bfloat16)
        packed = {_fit_group(spec, k): _quantize_pack(w, _fit_group(spec, k), "int2") for spec in formats}
        w_codes = jax.random.randint(key, (k, n), -127, 128, jnp.int32).astype(jnp.int8)
        w_scale = jnp.full((1, n), 0.01, jnp.float32)
        jax.block_until_ready((packed, w_codes))
        for m in BATCHES:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            flops = 2.0 * m * k * n
            dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
            t_ref = time_call(dot, (x, w_bf16), args.warmup, args.repeats)
            base = dict(m=m, k=k, n=n, flops=flops)
            ref_bytes = _nbytes(x, w_bf16) + m * n * 2
            _emit(records, dict(base, op="matmul", format="bf16 jnp.dot", impl="xla", seconds=t_ref, bytes=ref_bytes))
            for impl in impls:
                for spec, pw in packed.items():
                    fn = jax.jit(functools.partial(packed_matmul, impl=impl))
                    t = time_call(fn, (x, pw), args.warmup, args.repeats)
                    moved = _nbytes(pw.data, pw.scale, pw.zero, x) + m * n * 2
                    _emit(records, dict(base, op="packed_matmul", format=spec, impl=impl, seconds=t, bytes=moved,
                                        baseline_seconds=t_ref))
                x_codes = jnp.clip(jnp.round(x.astype(jnp.float32) * 40), -127, 127).astype(jnp.int8)
                x_scale = jnp.full((m, 1), 1 / 40, jnp.float32)
                fn = jax.jit(functools.partial(int8_matmul, impl=impl, out_dtype=jnp.bfloat16))
                t = time_call(fn, (x_codes, x_scale, w_codes, w_scale), args.warmup, args.repeats)
                moved = _nbytes(x_codes, x_scale, w_codes, w_scale) + m * n * 2
                _emit(records, dict(base, op="int8_matmul", format="w8a8", impl=impl, seconds=t, bytes=moved,
                                    baseline_seconds=t_ref))


def bench_attention(args, impls, records):
    batch, n_heads, n_kv, head_dim, page_size = args.attn_batch, 32, 8, 128, 16
    contexts = args.contexts or (CONTEXTS[:2] if args.quick else CONTEXTS)
    rng = np.random.default_rng(0)
    for context in contexts:
        pages_per_seq = context // page_size
        num_pages = batch * pages_per_seq
        pages = jax.random.normal(jax.random.PRNGKey(context), (num_pages, page_size, n_kv, head_dim), jnp.float32)
        tables = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq), jnp.int32)
        lengths = jnp.full((batch,), context, jnp.int32)
        q = jax.random.normal(jax.random.PRNGKey(1), (batch, n_heads, head_dim), jnp.bfloat16)
        caches = {"bf16": pages.astype(jnp.bfloat16), "int8": quantize_pages(pages, "int8"),
                  "int4": quantize_pages(pages, "int4")}
        flops = 4.0 * batch * n_heads * context * head_dim
        t_ref = {}
        for kind, cache in caches.items():
            cache_bytes = sum(_nbytes(a) for a in jax.tree_util.tree_leaves(cache))
            moved = 2 * cache_bytes + 2 * _nbytes(q) + _nbytes(tables, lengths)
            for impl in impls:
                fn = jax.jit(functools.partial(decode_attention, impl=impl))
                t = time_call(fn, (q, cache, cache, tables, lengths), args.warmup, args.repeats)
                if kind == "bf16":
                    t_ref[impl] = t  # each implementation is compared with its own bf16-cache run
                _emit(records, dict(op="decode_attention", format=f"{kind} cache", impl=impl, m=batch, k=context,
                                    n=n_heads, flops=flops, seconds=t, bytes=moved, baseline_seconds=t_ref.get(impl)))


HEADER = (f"{'op':<17}{'format':<16}{'impl':<6}{'M/B':>5}{'K/ctx':>7}{'N/H':>7}"
          f"{'ms':>10}{'GB/s':>9}{'TFLOP/s':>9}{'vs bf16':>9}")


def _emit(records, r):
    """Keep a measurement and print its table row at once (a cut-off run still shows its rows)."""
    records.append(r)
    speed = r["baseline_seconds"] / r["seconds"] if r.get("baseline_seconds") else None
    print(f"{r['op']:<17}{r['format']:<16}{r['impl']:<6}{r['m']:>5}{r['k']:>7}{r['n']:>7}"
          f"{r['seconds'] * 1e3:>10.3f}{r['bytes'] / r['seconds'] / 1e9:>9.2f}"
          f"{r['flops'] / r['seconds'] / 1e12:>9.4f}{(f'{speed:.2f}x' if speed else '-'):>9}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer formats, contexts and repeats")
    parser.add_argument("--impls", default="auto", help="comma-separated: auto, pallas, xla (default auto)")
    parser.add_argument("--ops", default="matmul,attention", help="comma-separated: matmul, attention")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation included)")
    parser.add_argument("--attn-batch", type=int, default=8, help="sequences in the decode-attention batch")
    parser.add_argument("--contexts", type=lambda t: [int(c) for c in t.split(",")], default=None,
                        help="decode-attention context lengths, comma-separated (multiples of 16)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 20
    impls = []
    for impl in (s.strip() for s in args.impls.split(",") if s.strip()):
        if impl not in ("auto", "pallas", "xla"):
            parser.error(f"--impls: unknown implementation {impl!r}; expected auto, pallas or xla")
        resolved = resolve_impl(impl, None)[0]  # interpret mode (CPU) is for tests, not timing
        if resolved == "pallas" and jax.default_backend() != "gpu":
            parser.error("--impls: the Pallas kernels are only timed on a GPU (interpret mode is a test tool)")
        if resolved not in impls:
            impls.append(resolved)
    ops = {s.strip() for s in args.ops.split(",") if s.strip()}
    if not ops <= {"matmul", "attention"}:
        parser.error(f"--ops: expected matmul and/or attention, got {sorted(ops)}")

    device = jax.devices()[0]
    print(f"backend {jax.default_backend()}, device {device.device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}, impls {impls}" + (", quick" if args.quick else ""))
    print(HEADER)
    print("-" * len(HEADER))
    records: list[dict] = []
    bench_read(args, records)
    if "matmul" in ops:
        bench_matmuls(args, impls, records)
    if "attention" in ops:
        bench_attention(args, impls, records)
    if args.json:
        meta = dict(backend=jax.default_backend(), device=device.device_kind, jax=jax.__version__,
                    date=datetime.date.today().isoformat(), host=platform.node(),
                    args=vars(args) | {"json": str(args.json)})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, results=records), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
