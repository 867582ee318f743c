"""Real-model speed and memory: lowbit's SmolLM2-135M (f32, on the GGUF's own Q4_1/Q8_0 blocks, and
packed checkpoints such as GPTQ int4 or ternary) against llama.cpp on the same Q4_1 GGUF.

Each engine runs in its own subprocess (peak RSS is separable) and rounds interleave; `--help`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lowbit.data.corpus import load_text, split_tokens
from lowbit.models.registry import resolve_model
from lowbit.models.tokenizer import Tokenizer

# (metric, label, target ratio lowbit / llama.cpp, target ratio lowbit / lowbit f32) from issue 15
METRICS = [
    ("eval_tps", "evaluation: all logits of a 512-token window (tokens/s)", 1.5, None),
    ("prefill_tps", "prefill: 512-token prompt, last logits only (tokens/s)", 1.5, None),
    ("decode_short_tps", "greedy decode after a 16-token prompt (tokens/s)", 1.0, 2.0),
    ("decode_long_tps", "greedy decode after a 512-token prompt (tokens/s)", 1.0, 2.0),
]
# RSS after load: lowbit at most this multiple of llama.cpp's.
RSS_TARGET = 1.3
# lowbit variants: "f32" (the GGUF dequantized to f32), "gguf" (the file's own blocks through
# gguf_matmul), or a packed checkpoint directory given with --checkpoint NAME=DIR; a variant or
# directory ending in INT8 runs its packed/GGUF layers on int8 activations (set_activations), one ending
# in AUTO on "auto" activations (int8 in the decode GEMVs, f32 in the prefill GEMMs: `lowbit generate`'s
# CPU default, with KV16), one ending in KV16 decodes with an f16 KV cache (layout "f16", as llama.cpp's
# default cache) instead of f32.
LOWBIT_VARIANTS = ("f32", "gguf")
INT8 = "+a8"
AUTO = "+auto"
KV16 = "+kv16"
ACTIVATION_SUFFIXES = {INT8: "int8", AUTO: "auto"}


def split_variant(variant: str) -> tuple[str, str, str]:
    """(variant or directory, activations, KV layout) of a name with INT8 / AUTO / KV16 suffixes."""
    activations, layout = "f32", "f32"
    while variant.endswith((INT8, AUTO, KV16)):
        if variant.endswith(KV16):
            layout, variant = "f16", variant.removesuffix(KV16)
            continue
        suffix = INT8 if variant.endswith(INT8) else AUTO
        activations, variant = ACTIVATION_SUFFIXES[suffix], variant.removesuffix(suffix)
    return variant, activations, layout


def _rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _inputs(model_path: str, ctx: int, short: int) -> tuple[np.ndarray, np.ndarray]:
    """A ctx-token window from the pydoc evaluation split, and a short prompt before it."""
    ids = np.asarray(Tokenizer.from_gguf(model_path).encode(load_text()), np.int32)
    _, evaluation = split_tokens(ids)
    return evaluation[:ctx], evaluation[ctx:ctx + short]


def _load_lowbit(model_path: str, variant: str):
    from lowbit.checkpoint import load
    from lowbit.models.loader import load_gguf_model
    from lowbit.nn import set_activations

    variant, activations, _ = split_variant(variant)
    if variant in LOWBIT_VARIANTS:
        model, config = load_gguf_model(model_path, runtime="packed" if variant == "gguf" else "dequant")
    else:
        model = load(variant, runtime="packed")
        config = model.config
    if activations != "f32" and not set_activations(model, activations):
        raise SystemExit(f"{variant}: no layer of this model takes {activations} activations")
    return model, config


def run_lowbit(model_path: str, variant: str, ctx: int, short: int, new_tokens: int, repeats: int) -> dict:
    from lowbit.kernels.dispatch import schedule_cpu_for_memory

    schedule_cpu_for_memory()  # as the lowbit CLI does, before JAX's first computation
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lowbit.decode import generate

    window, prompt = _inputs(model_path, ctx, short)
    rss_start = _rss_mib()
    start = time.perf_counter()
    model, config = _load_lowbit(model_path, variant)
    layout = split_variant(variant)[2]
    load_s = time.perf_counter() - start
    rss_loaded = _rss_mib()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    tokens = jnp.asarray(window[None])
    compile_start = time.perf_counter()
    jax.block_until_ready(forward(state, tokens))
    compile_s = time.perf_counter() - compile_start
    eval_s = _median_time(lambda: jax.block_until_ready(forward(state, tokens)), repeats)

    def prefill():  # the prompt through the cache to the first token
        begin = time.perf_counter()
        generate(model, window, 1, layout=layout)
        return time.perf_counter() - begin

    prefill()
    prefill_s = statistics.median(prefill() for _ in range(repeats))

    def decode_tps(prompt_ids: np.ndarray) -> float:
        # new_tokens decode steps after the first token, timed inside generate (its "first_token"
        # and "end" stamps), so the prefill and the cache set-up are outside the figure. (Until
        # 2026-12-05 this was generate(n + 1) - generate(1), whose two noisy terms swung the decode
        # figure by 2x once decoding ran 16 steps per dispatch.)
        generate(model, prompt_ids, new_tokens + 1, layout=layout)

        def seconds() -> float:
            stamps: dict = {}
            generate(model, prompt_ids, new_tokens + 1, layout=layout, timings=stamps)
            return stamps["end"] - stamps["first_token"]

        return new_tokens / statistics.median(seconds() for _ in range(repeats))

    return dict(load_s=load_s, compile_s=compile_s, eval_tps=ctx / eval_s,
                prefill_tps=ctx / prefill_s, decode_short_tps=decode_tps(prompt),
                decode_long_tps=decode_tps(window), rss_start_mib=rss_start,
                rss_loaded_mib=rss_loaded, peak_rss_mib=_peak_rss_mib())


def run_llamacpp(model_path: str, ctx: int, short: int, new_tokens: int, repeats: int,
                 threads: int) -> dict:
    from llama_cpp import Llama

    window, prompt = _inputs(model_path, ctx, short)
    window, prompt = window.tolist(), prompt.tolist()
    rss_start = _rss_mib()
    start = time.perf_counter()
    llm = Llama(model_path, n_ctx=ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    rss_loaded = _rss_mib()

    def evaluate():
        llm.reset()
        llm.eval(window)

    evaluate()
    eval_s = _median_time(evaluate, repeats)
    llm.close()
    del llm
    # Prefill and decode without logits_all, so only the last position's logits are computed.
    llm = Llama(model_path, n_ctx=ctx + new_tokens + 64, logits_all=False, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def prefill():
        llm.reset()
        llm.eval(window)

    prefill()
    prefill_s = _median_time(prefill, repeats)

    def decode_once(prompt_ids: list[int]) -> float:
        # Time from the first greedy token (after the prompt) to the (n+1)-th: n decode steps.
        llm.reset()
        steps = llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
        next(steps)
        begin = time.perf_counter()
        for _ in range(new_tokens):
            next(steps)
        elapsed = time.perf_counter() - begin
        steps.close()
        return elapsed

    def decode_tps(prompt_ids: list[int]) -> float:
        decode_once(prompt_ids)
        return new_tokens / statistics.median(decode_once(prompt_ids) for _ in range(repeats))

    result = dict(load_s=load_s, compile_s=0.0, eval_tps=ctx / eval_s, prefill_tps=ctx / prefill_s,
                  decode_short_tps=decode_tps(prompt), decode_long_tps=decode_tps(window),
                  rss_start_mib=rss_start, rss_loaded_mib=rss_loaded,
                  peak_rss_mib=_peak_rss_mib())
    llm.close()
    return result


def _worker(args) -> None:
    if args.worker.startswith("lowbit:"):
        result = run_lowbit(args.model, args.worker.split(":", 1)[1], args.ctx, args.short, args.new_tokens,
                            args.repeats)
    else:
        result = run_llamacpp(args.model, args.ctx, args.short, args.new_tokens, args.repeats,
                              int(args.worker.split(":")[1]))
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(config: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", config, "--model", args.model,
               "--ctx", str(args.ctx), "--short", str(args.short), "--new-tokens",
               str(args.new_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{config} worker failed (exit {done.returncode}):\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _versions() -> str:
    import jax

    try:
        import llama_cpp

        llama = llama_cpp.__version__
    except ImportError:
        llama = "absent"
    return f"jax {jax.__version__}, llama-cpp-python {llama}"


def _label(config: str, names: dict[str, str]) -> str:
    if config.startswith("lowbit:"):
        return f"lowbit {names.get(config, config.split(':', 1)[1])}"
    threads = int(config.split(":")[1])
    return f"llama.cpp {threads} thread{'s' if threads > 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="registered name or GGUF path")
    parser.add_argument("--ctx", type=int, default=512, help="window / prompt length")
    parser.add_argument("--short", type=int, default=16, help="short prompt length for decode")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved worker rounds")
    parser.add_argument("--llamacpp-threads", default=",".join(
        sorted({"1", str(os.cpu_count() or 1)})),
        help="llama.cpp thread counts to run, comma separated; ratios use the fastest "
             "(XLA always uses every core)")
    parser.add_argument("--lowbit", default="f32,gguf",
                        help="lowbit variants, comma separated: f32 (the GGUF dequantized), gguf (its own blocks); "
                             f"{INT8} after a variant: its layers on int8 activations (e.g. gguf{INT8}), {AUTO}: "
                             f"on auto activations (int8 decode GEMVs, f32 prefill); "
                             f"{KV16}: decoding with an f16 KV cache (e.g. gguf{AUTO}{KV16})")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="also run a packed lowbit checkpoint (lowbit quantize --out DIR), e.g. gptq=/tmp/gptq; "
                             f"DIR{INT8} / DIR{AUTO}: on int8 / auto activations, DIR{KV16}: with an f16 KV cache")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    args.model = str(resolve_model(args.model))
    variants = [v for v in args.lowbit.split(",") if v]
    if any(split_variant(v)[0] not in LOWBIT_VARIANTS for v in variants):
        raise SystemExit(f"--lowbit takes {', '.join(LOWBIT_VARIANTS)}, got {args.lowbit!r}")
    names = {f"lowbit:{v}": v for v in variants}
    for entry in args.checkpoint:
        name, _, directory = entry.partition("=")
        directory, activations, layout = split_variant(directory)
        suffix = {mode: s for s, mode in ACTIVATION_SUFFIXES.items()}.get(activations, "") + \
            (KV16 if layout == "f16" else "")
        if not directory or not Path(directory).is_dir():
            raise SystemExit(f"--checkpoint must be NAME=DIR with an existing DIR, got {entry!r}")
        names[f"lowbit:{Path(directory).resolve()}{suffix}"] = name
    configs = list(names) + [f"llamacpp:{int(t)}" for t in args.llamacpp_threads.split(",")]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {config: [] for config in configs}
    loads: list[float] = []
    for round_index in range(args.rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]
        for config in order:
            loads.append(os.getloadavg()[0])
            runs[config].append(_spawn(config, args))
            print(f"round {round_index + 1}/{args.rounds} {_label(config, names)} (load {loads[-1]:.1f}): "
                  + ", ".join(f"{k}={v:.1f}" for k, v in runs[config][-1].items()), flush=True)
    load_after = os.getloadavg()
    med = {config: {key: statistics.median(r[key] for r in runs[config]) for key in runs[config][0]}
           for config in configs}
    lowbits = [c for c in configs if c.startswith("lowbit:")]
    references = [c for c in configs if c.startswith("llamacpp:")]
    f32 = "lowbit:f32" if "lowbit:f32" in med else None

    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores, {_versions()}; 1-minute load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f}, {min(loads):.1f}-{max(loads):.1f} at the worker starts; medians of "
          f"{args.rounds} rounds x {args.repeats} repeats\n")
    header = ["measure"] + [_label(c, names) for c in configs]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, label in [(key, label) for key, label, _, _ in METRICS] + [
            ("rss_loaded_mib", "RSS after loading the model (MiB)"), ("peak_rss_mib", "peak RSS (MiB)"),
            ("load_s", "model load (s)"), ("compile_s", "first forward incl. compile (s)")]:
        print(f"| {label} | " + " | ".join(f"{med[c][key]:.1f}" for c in configs) + " |")

    print("\nRatios against the best llama.cpp thread count (and lowbit f32 for decode), targets of issue 15:\n")
    header = ["lowbit variant"] + [f"{key} / llama.cpp (>= {t}x)" for key, _, t, _ in METRICS] + [
        f"{key} / lowbit f32 (>= {t}x)" for key, _, _, t in METRICS if t] + [f"RSS after load / llama.cpp (<= {RSS_TARGET}x)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for config in lowbits:
        cells = []
        for key, _, target, _ in METRICS:
            ratio = med[config][key] / max(med[c][key] for c in references)
            cells.append(f"{ratio:.2f}x {'met' if ratio >= target else 'not met'}")
        for key, _, _, target in METRICS:
            if target and f32:
                ratio = med[config][key] / med[f32][key]
                cells.append(f"{ratio:.2f}x {'met' if ratio >= target else 'not met'}")
            elif target:
                cells.append("-")
        ratio = med[config]["rss_loaded_mib"] / min(med[c]["rss_loaded_mib"] for c in references)
        cells.append(f"{ratio:.2f}x {'met' if ratio <= RSS_TARGET else 'not met'}")
        print(f"| {_label(config, names)} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(dict(runs=runs, names=names, load_before=load_before,
                                             load_after=load_after, loads=loads), indent=2))


if __name__ == "__main__":
    main()
