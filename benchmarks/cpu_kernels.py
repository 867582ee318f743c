"""CPU GEMV/GEMM of the native packed kernels on SmolLM2's shapes: time, GB/s vs copy bandwidth, vs f32 dot.

Each kernel runs `--inner` times inside one jitted loop (the next x depends on the last y, so no call
is hoisted or skipped); the median and the best of `--repeats` loops, divided by `--inner`, are one
call's time (on a shared machine the best is the kernel, the median what a busy machine gives).
A format name ending in " a8" is the same kernel with int8 activations (x rounded per row and block,
integer dots). `--grad` times the forward and the input gradient (x-bar of sum(y * y)) instead: a training step's matmuls.
`--decode` instead times SmolLM2's greedy decode with its block linears frozen to packed int4:g64 (RTN),
the packed layers' activations f32 vs int8, in interleaved rounds. `--simd-levels 1,2` times every
native case (and, with --decode, the int8 decode) with the kernels' SIMD capped at each level
(1 AVX2, 2 AVX-512 VNNI; `lowbit.kernels.native.simd_at_most`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.kernels import gguf_matmul, int8_matmul, packed_matmul
from lowbit.kernels.native import native_available, native_error, simd_at_most, simd_level
from lowbit.kernels.packed_matmul.native import packed_matmul_native
from lowbit.kernels.packed_matmul.reference import float_scales, weight_format

# (K, N) of SmolLM2-135M's linears: q/o, k/v, gate/up, down, and the tied output head.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
PACKED = ["int4:g32:asym", "int4:g64", "ternary:g64"]
GGUF = ["Q4_0", "Q4_1", "Q8_0"]


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """GB/s of numpy copying a `mib` MiB array (bytes read + bytes written, best of `repeats`)."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_time(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """GB/s of numpy summing a `mib` MiB float32 array (bytes read only, best of `repeats`)."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    best = min(_time(lambda: src.sum()) for _ in range(repeats))
    return src.nbytes / best / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def loop_time(matmul, x, weight, inner: int, repeats: int, grad: bool = False) -> tuple[float, float]:
    """(median, best) seconds per matmul(x, weight) call (with `grad`: its forward and input gradient)
    in a jitted fori_loop of `inner` dependent calls."""
    if grad:
        forward = matmul

        def matmul(x, weight):
            return jax.grad(lambda x: jnp.sum(jnp.square(forward(x, weight))))(x)

    @jax.jit
    def run(x, weight):
        def body(_, x):
            y = matmul(x, weight)
            return x + 0.0 * jnp.sum(y[..., :1]).astype(x.dtype)  # a data dependency, no real change
        return jax.lax.fori_loop(0, inner, body, x)

    jax.block_until_ready(run(x, weight))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(x, weight))
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples), min(samples)


def _nbytes(tree) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def _fit_group(spec: str, k: int) -> str:
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


def bench(args):
    from gguf import GGMLQuantizationType, quants

    rows = []
    rng = np.random.default_rng(0)
    for k, n in args.shapes:
        w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        for m in args.batches:
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            cases = [("f32 jnp.dot", "xla", lambda x, w: jnp.dot(x, w), jnp.asarray(w))]
            for spec in args.packed:
                spec = _fit_group(spec, k)
                pw = pack(quantize(jnp.asarray(w), spec), ternary="int2")
                for impl in args.impls:
                    if impl == "gemv":  # the native GEMV at every row count (where the GEMM would take over)
                        fmt, plain = weight_format(pw), float_scales(pw)
                        cases.append((spec, impl, lambda x, _, plain=plain, fmt=fmt: packed_matmul_native(
                            x, plain, fmt, gemm_rows=1 << 30), pw))
                    else:
                        cases.append((spec, impl, functools.partial(packed_matmul, impl=impl), pw))
                if "native" in args.impls and not args.grad and weight_format(pw).levels is None:
                    cases.append((f"{spec} a8", "native", functools.partial(  # x rounded to int8 per block
                        packed_matmul, impl="native", activations="int8"), pw))
            for name in args.gguf:
                blocks = jnp.asarray(quants.quantize(np.ascontiguousarray(w.T), GGMLQuantizationType[name]))
                for impl in (i for i in args.impls if i != "gemv"):
                    cases.append((name, impl, functools.partial(gguf_matmul, ggml_type=name, impl=impl), blocks))
                if "native" in args.impls and not args.grad:  # x rounded to int8 per 32-block, integer dots
                    cases.append((f"{name} a8", "native", functools.partial(
                        gguf_matmul, ggml_type=name, impl="native", activations="int8"), blocks))
            codes = jnp.asarray(np.clip(np.round(w / np.abs(w).max(0) * 127), -127, 127).astype(np.int8))
            wscale = jnp.asarray(np.abs(w).max(0, keepdims=True) / 127)
            for impl in (i for i in args.impls if i != "gemv" and args.w8a8):
                def w8a8(x, weight, impl=impl):
                    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
                    xq = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
                    return int8_matmul(xq, scale, weight[0], weight[1], impl=impl)
                cases.append(("int8 w8a8", impl, w8a8, (codes, wscale)))
            base = None
            for fmt, impl, fn, weight in cases:
                for level in (args.simd_levels or [None]) if impl in ("native", "gemv") else [None]:
                    with simd_at_most(level) if level is not None else contextlib.nullcontext():
                        median, best = loop_time(fn, x, weight, args.inner, args.repeats, args.grad)
                    label = impl if level is None else f"{impl}/{level}"
                    moved = _nbytes(weight)
                    base = (median, best) if base is None else base
                    row = dict(k=k, n=n, m=m, format=fmt, impl=label, us_median=median * 1e6, us_best=best * 1e6,
                               weight_bytes=moved, gbs_best=moved / best / 1e9, vs_f32_median=base[0] / median,
                               vs_f32_best=base[1] / best)
                    rows.append(row)
                    print(f"{k:>6}x{n:<6}{m:>4}  {fmt:<15}{label:<9}{row['us_median']:>10.1f}{row['us_best']:>10.1f}"
                          f"{moved / 1024:>9.0f}{row['gbs_best']:>8.2f}{row['vs_f32_median']:>8.2f}x"
                          f"{row['vs_f32_best']:>7.2f}x", flush=True)
    return rows


def decode(new_tokens: int, rounds: int, levels: list[int] | None = None) -> None:
    """Greedy decode tok/s of SmolLM2 (block linears RTN int4:g64, frozen to packed layers on the native
    kernel; head and embedding f32) with the packed layers' activations f32 and int8 (int8 at each SIMD
    level of `levels`, else at this CPU's), one model, interleaved rounds; rate = (new_tokens - 1) /
    the time from the first new token to the last (generate's stamps); then both activations'
    perplexity on 8 windows of 256 tokens of the pydoc evaluation split."""
    from flax import nnx

    from lowbit.decode import generate
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import fetch
    from lowbit.nn.packed_layer import PackedLayer
    from lowbit.nn.packed_linear import freeze
    from lowbit.nn.rules import preset_rules, quantize_model

    model, _ = load_gguf_model(fetch("smollm2-135m"))
    quantize_model(model, preset_rules("int4-g64"))
    summary = freeze(model)
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, PackedLayer)]
    prompt = np.array([1, 504, 3458, 282, 4649, 314, 253, 1345], np.int32)

    def run(mode: str):
        """(decode tok/s after the first token, from generate's own time stamps; the tokens)."""
        activations, _, level = mode.partition(" simd ")
        for layer in layers:
            layer.activations = activations
        with simd_at_most(int(level)) if level else contextlib.nullcontext():
            stamps: dict = {}
            out = generate(model, prompt, new_tokens, timings=stamps)
        return (new_tokens - 1) / (stamps["end"] - stamps["first_token"]), np.asarray(out)

    modes = ("f32", *(f"int8 simd {level}" for level in levels)) if levels else ("f32", "int8")
    outputs = {mode: run(mode)[1] for mode in modes}  # compiles
    rates = {mode: [] for mode in modes}
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            rates[mode].append(run(mode)[0])
        loads.append(os.getloadavg()[0])
    int8 = modes[1]
    agree = float(np.mean(outputs["f32"] == outputs[int8]))
    from lowbit.data.corpus import load_text, split_tokens
    from lowbit.eval.perplexity import perplexity
    from lowbit.models.tokenizer import Tokenizer

    tokens = split_tokens(np.asarray(Tokenizer.from_gguf(fetch("smollm2-135m")).encode(load_text()), np.int32))[1]
    ppl = {}
    for mode in ("f32", "int8"):
        for layer in layers:
            layer.activations = mode
        ppl[mode] = perplexity(model, tokens, ctx=256, windows=8).ppl
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, 1-minute load "
          f"{min(loads):.1f}-{max(loads):.1f}; {summary}; {rounds} interleaved rounds of {new_tokens} new tokens")
    for mode in modes:
        print(f"activations {mode}: decode median {statistics.median(rates[mode]):.1f} tok/s, "
              f"best {max(rates[mode]):.1f} tok/s")
    for mode in modes[2:]:
        print(f"{mode} / {int8} (medians): {statistics.median(rates[mode]) / statistics.median(rates[int8]):.2f}x")
    print(f"{int8} / f32 (medians): {statistics.median(rates[int8]) / statistics.median(rates['f32']):.2f}x; "
          f"greedy tokens equal: {agree:.0%}; perplexity (pydoc evaluation split, 8 windows of 256 tokens): "
          f"f32 {ppl['f32']:.4f}, int8 {ppl['int8']:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=lambda t: [int(v) for v in t.split(",")], default=[1],
                        help="activation rows M, comma-separated (default 1: decode GEMV)")
    parser.add_argument("--shapes", type=lambda t: [tuple(int(v) for v in s.split("x")) for s in t.split(",")],
                        default=SHAPES, help="K x N shapes, e.g. 576x576,1536x576 (default: SmolLM2's)")
    parser.add_argument("--impls", type=lambda t: t.split(","), default=["native", "xla"],
                        help="implementations of the low-bit kernels (default native,xla; also auto, and gemv: "
                             "packed_matmul's native GEMV at every row count)")
    parser.add_argument("--packed", type=lambda t: [v for v in t.split(",") if v], default=PACKED,
                        help=f"packed specs, comma-separated (default {','.join(PACKED)}; empty: none)")
    parser.add_argument("--gguf", type=lambda t: [v for v in t.split(",") if v], default=GGUF,
                        help=f"GGUF block types (default {','.join(GGUF)}; empty: none)")
    parser.add_argument("--no-w8a8", dest="w8a8", action="store_false", help="skip the int8 W8A8 kernel")
    parser.add_argument("--grad", action="store_true", help="time forward + input gradient (training)")
    parser.add_argument("--inner", type=int, default=50, help="calls per jitted loop")
    parser.add_argument("--repeats", type=int, default=7, help="loops timed (median taken)")
    parser.add_argument("--decode", action="store_true",
                        help="instead: SmolLM2 int4:g64 decode tok/s, packed layers' activations f32 vs int8")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per timing with --decode")
    parser.add_argument("--simd-levels", type=lambda t: [int(v) for v in t.split(",")], default=None,
                        help="time the native kernels at each SIMD cap, e.g. 1,2 (1 AVX2, 2 AVX-512 VNNI)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if "native" in args.impls and not native_available():
        parser.error(f"--impls native: the native kernels are unavailable: {native_error()}")
    if args.decode:
        decode(args.new_tokens, args.repeats, args.simd_levels)
        return
    copy, read = copy_bandwidth(), read_bandwidth()
    load = os.getloadavg()[0]
    threads = os.environ.get("LOWBIT_NATIVE_THREADS", "all")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}, simd level {simd_level() if native_available() else '-'}, "
          f"native threads {threads}, load {load:.1f}; numpy copy {copy:.1f} GB/s (read+write), "
          f"sum {read:.1f} GB/s (read)")
    print(f"{'K x N':<13}{'M':>4}  {'format':<15}{'impl':<9}{'us med':>10}{'us best':>10}{'KiB':>9}"
          f"{'GB/s':>8}{'f32/med':>9}{'f32/best':>8}  (GB/s: weight bytes / best time)")
    rows = bench(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(copy_gbs=copy, read_gbs=read, load=load, rows=rows), indent=1))


if __name__ == "__main__":
    main()
