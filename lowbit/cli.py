"""The `lowbit` command: readable tables by default, one JSON object with --json."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from lowbit.table import print_table


def _emit(args, payload: dict, rows: list[dict], columns: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps(payload, indent=None))
    else:
        print_table(rows, columns)


def cmd_specs(args) -> None:
    from lowbit.core.error import TABLE_SPECS, quantization_error, synthetic_weights

    specs = args.spec or list(TABLE_SPECS)
    rows = []
    for dist in ("gaussian", "laplace"):
        x = synthetic_weights(dist, (args.rows, args.cols))
        for spec in specs:
            e = quantization_error(x, spec)
            rows.append({"data": dist, "spec": e.spec, "bits_per_weight": round(e.bits_per_weight, 4),
                         "mse": e.mse, "snr_db": round(e.snr_db, 2)})
    _emit(args, {"rows": rows}, rows)


def cmd_fetch(args) -> None:
    from lowbit.models.registry import fetch, sha256_of

    path = fetch(args.name)
    info = {"name": args.name, "path": str(path), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    _emit(args, info, [info])


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(name_or_path: str, runtime: str = "packed"):
    """(model, tokenizer) for a registered name, a GGUF path or a quantized checkpoint directory
    (loaded with `runtime` "packed" or "dequant")."""
    from pathlib import Path

    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model
    from lowbit.models.tokenizer import Tokenizer

    if Path(name_or_path).is_dir():
        from lowbit.ptq.cli import load_checkpoint

        model, tokenizer_source = load_checkpoint(name_or_path, runtime)
        if tokenizer_source is None:
            raise ValueError(f"checkpoint {name_or_path} names no source model to take the tokenizer from")
        return model, Tokenizer.from_gguf(resolve_model(tokenizer_source))
    path = resolve_model(name_or_path)
    model, _ = load_gguf_model(path)
    return model, Tokenizer.from_gguf(path)


def cmd_eval(args) -> None:
    import math
    import time

    from lowbit.data.corpus import corpus_tokens, default_split
    from lowbit.eval import kl_divergence, perplexity

    if args.ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens, got {args.ctx}")
    if args.windows is not None and args.windows < 1:
        raise ValueError(f"--windows must be a positive integer, got {args.windows}")
    split = args.split or default_split(args.text)
    model, tokenizer = load_model(args.model, args.runtime)
    tokens, first_token = corpus_tokens(tokenizer, args.text, split)
    start = time.perf_counter()
    scoring = {"ctx": args.ctx, "windows": args.windows, "progress": not args.quiet, "score": args.score}
    if args.ref:
        ref_model, _ = load_model(args.ref)
        r = kl_divergence(model, ref_model, tokens, **scoring)
        info = {"ppl": r.ppl, "ref_ppl": r.ref_ppl, "kl": r.kl, "top1": r.top1, "tokens": r.tokens_scored,
                "windows": r.windows}
    else:
        r = perplexity(model, tokens, **scoring)
        info = {"ppl": r.ppl, "tokens": r.tokens_scored, "windows": r.windows}
    # What was scored: windows of ctx tokens back to back from token first_token of the text's
    # token stream, each scored under the convention `score`.
    info.update(score=args.score, split=split, first_token=first_token)
    values = {key: info[key] for key in ("ppl", "ref_ppl", "kl") if key in info}
    if not all(math.isfinite(value) for value in values.values()):
        raise ValueError(f"the evaluation of {args.model} is not finite ({values}): the model "
                         "computes NaN or inf, which is not reported as a result")
    seconds = time.perf_counter() - start
    info.update(model=args.model, runtime=args.runtime, text=args.text, ctx=args.ctx, seconds=round(seconds, 2),
                tokens_per_s=round(info["windows"] * args.ctx / seconds, 1), peak_rss_mb=round(peak_rss_mb(), 1))
    _emit(args, info, [info])


def cmd_generate(args) -> None:
    import time

    import jax

    from lowbit.decode.cli import check_generate_arguments, read_prompts, run_generate_kv, wants_kv_generation
    from lowbit.decode.compilation import CompileMeter, enable_compilation_cache
    from lowbit.decode import generate

    check_generate_arguments(args)  # before the model loads
    prompt = read_prompts(args)[0]
    enable_compilation_cache()
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - start
    with CompileMeter() as meter:
        if wants_kv_generation(args):
            run_generate_kv(args, model, tokenizer, meter=meter, load_s=load_s)
            return
        ids = tokenizer.encode(prompt)
        key = jax.random.key(args.seed) if args.temperature > 0 else None
        stamps = {}
        new = generate(model, ids, args.max_new_tokens, temperature=args.temperature, key=key,
                       eos_id=tokenizer.eos_id, timings=stamps)
    new = [int(t) for t in new.reshape(-1)]
    seconds = stamps["end"] - stamps["start"]
    prefill_s = stamps["first_token"] - stamps["start"]
    decode_s = stamps["end"] - stamps["first_token"]
    prefill_compile, decode_compile = meter.seconds_of("prefill"), meter.seconds_of("decode")
    info = {"tokens": new, "text": tokenizer.decode(new), "prompt_tokens": len(ids),
            "prompt_bucket": stamps["bucket"], "seconds": round(seconds, 3),
            "tokens_per_s": round(len(new) / seconds, 2), "load_s": round(load_s, 3),
            "first_token_s": round(prefill_s, 3), "compile_s": round(meter.seconds, 3),
            "prefill_tok_s": round(len(ids) / max(prefill_s - prefill_compile, 1e-9), 1),
            "decode_tok_s": (round((len(new) - 1) / max(decode_s - decode_compile, 1e-9), 2)
                             if len(new) > 1 else None)}
    if args.json:
        print(json.dumps(info))
    else:
        print(prompt + info["text"])
        print(f"[{len(new)} tokens in {seconds:.2f} s; first token after {prefill_s:.2f} s, compile "
              f"{info['compile_s']} s, prefill {info['prefill_tok_s']} tok/s, decode {info['decode_tok_s']} "
              "tok/s]", file=sys.stderr)


def cmd_quantize(args) -> None:
    from lowbit.ptq.cli import run_quantize

    info = run_quantize(args)
    columns = ["method", "weights", "bits_per_weight", "mean_layer_rel_error", "quantize_seconds", "out"]
    _emit(args, info, [info], columns)


def cmd_train(args) -> None:
    from lowbit.train.cli import run_train

    run_train(args)


def cmd_finetune(args) -> None:
    from lowbit.train.cli import run_finetune

    run_finetune(args)


def cmd_sweep(args) -> None:
    from lowbit.eval.sweep import load_sweep_config, result_columns, run_sweep

    config = load_sweep_config(args.config)
    result = run_sweep(config, results_root=args.results, limit=args.limit, dry_run=args.dry_run,
                       progress=not args.quiet and sys.stderr.isatty())
    rows = [{k: v for k, v in row.items() if v is not None} for row in result.rows]
    _emit(args, result.to_json(), rows, result_columns(result.rows))
    if result.failed:
        print(f"lowbit sweep: error: {result.failed} of {len(result.rows)} points failed (status "
              f"'error: ...' in {result.csv_path}; a rerun retries them)", file=sys.stderr)
        return 1
    return 0


def cmd_activations(args) -> None:
    from lowbit.eval.activations import report, run

    report(args, run(args))


def cmd_export(args) -> None:
    import warnings

    from lowbit.export import export_gguf

    if args.format != "gguf":
        raise ValueError(f"--format must be gguf, got {args.format!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_gguf(args.model, args.out, args.type, force=args.force)
    report["warnings"] = sorted({str(w.message) for w in caught})
    for message in report["warnings"]:
        print(f"lowbit export: warning: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
        return
    print_table([{k: r.get(k, "") for k in ("name", "type", "weights", "exact", "mse", "note")}
                 for r in report["tensors"]])
    print(f"wrote {report['path']} ({report['bytes']} bytes, {report['type']}): "
          f"{report['exact_tensors']} of {len(report['tensors'])} tensors exact, added weight "
          f"MSE {report['weight_mse']:.4g}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit and ternary models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = add("specs", cmd_specs, "quantization error (MSE, SNR, bits per weight) of each spec on synthetic data")
    p.add_argument("--spec", action="append", help="a spec string (repeatable); default: a table of common specs")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1024)

    p = add("fetch", cmd_fetch, "download a named model into the cache and verify it")
    p.add_argument("name")

    p = add("eval", cmd_eval, "perplexity (and KL against --ref) over non-overlapping windows of a text")
    p.add_argument("--model", default="smollm2-135m", help="registered name, GGUF path or quantized directory")
    p.add_argument("--text", default="pydoc", help="'pydoc' (the embedded corpus) or a text file")
    p.add_argument("--split", default=None, choices=("all", "calibration", "evaluation"),
                   help="which tokens of the text: all (from its first token), or the calibration / "
                        "evaluation half; default: evaluation for pydoc, all for a file")
    p.add_argument("--score", default="all", choices=("all", "second-half"),
                   help="positions scored per window: all after the first (GPTQ convention, default) or "
                        "the second half only (llama.cpp's llama-perplexity)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=None, help="number of windows (default: all)")
    p.add_argument("--ref", default=None, help="reference model for KL divergence and top-1 agreement")
    p.add_argument("--runtime", default="packed", choices=("packed", "dequant"),
                   help="a quantized checkpoint's layers: packed (codes in memory, packed matmul; default) or "
                        "dequant (weights dequantized once into float layers: fake-quant, for research)")

    p = add("generate", cmd_generate, "generate text (greedy by default)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-file", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    from lowbit.decode.cli import add_generate_kv_arguments

    add_generate_kv_arguments(p)

    from lowbit.ptq.cli import add_quantize_arguments

    add_quantize_arguments(add("quantize", cmd_quantize, "post-training quantization into a checkpoint directory"))

    from lowbit.train.cli import add_train_arguments

    add_train_arguments(add("train", cmd_train, "quantization-aware training from a TOML config"))

    from lowbit.train.cli import add_finetune_arguments

    add_finetune_arguments(add("finetune", cmd_finetune, "fine-tune a model: QLoRA (adapters on a frozen "
                                                         "NF4 base, the default), LoRA on the float base, or full"))

    from lowbit.eval.activations import add_arguments as add_activation_arguments

    add_activation_arguments(add("activations", cmd_activations,
                                 "per-layer statistics of every linear input (absmax, "
                                 "percentiles, kurtosis, outlier features), as JSON and a plot"))

    from lowbit.export import EXPORT_TYPES

    p = add("export", cmd_export, "write a model (float or a quantized checkpoint) to a GGUF file "
                                  "that llama.cpp runs")
    p.add_argument("--model", required=True,
                   help="a quantized checkpoint directory, a registered name or a GGUF path")
    p.add_argument("--format", default="gguf", help="output format (gguf, the only one)")
    p.add_argument("--type", required=True, type=str.upper, choices=EXPORT_TYPES,
                   help="type of the linear weights")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = add("sweep", cmd_sweep, "run a grid of quantization points from a TOML config into "
                                "results/NAME/results.csv (resumable) and draw its plots")
    p.add_argument("config", help="a sweep config, e.g. experiments/clip_sweep.toml")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and list the points (done / pending / skipped); run nothing")
    p.add_argument("--limit", type=int, default=None, help="run at most N pending points")
    p.add_argument("--results", default="results", help="results root (default: results)")
    return parser


def error_message(err: BaseException) -> str | None:
    """The one-line message for an error the user can act on (bad input, the file system, a KV
    pool or memory too small); None for anything else, which is a bug and keeps its traceback."""
    allocator = sys.modules.get("lowbit.kvcache.allocator")
    if isinstance(err, ValueError) or (allocator and isinstance(err, allocator.OutOfBlocksError)):
        return str(err)
    if isinstance(err, OSError):  # missing, existing or unwritable paths, a full disk, ...
        return str(err)
    if isinstance(err, MemoryError):
        return "out of host memory"
    jax = sys.modules.get("jax")
    if jax and isinstance(err, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(err):
        return "out of device memory: " + str(err).strip().splitlines()[0]
    return None


class _Interrupts:
    """SIGINT raises KeyboardInterrupt as usual; if the exception is swallowed (it can land in a
    garbage-collector callback, e.g. JAX's, where Python ignores exceptions), the signal is sent
    again until main() has seen it."""

    def __init__(self):
        self.pending = False

    def handle(self, signum, frame):
        self.pending = True
        retry = threading.Timer(0.2, self._resend)
        retry.daemon = True
        retry.start()
        raise KeyboardInterrupt

    def _resend(self):
        if self.pending:
            os.kill(os.getpid(), signal.SIGINT)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield
        finally:
            self.pending = False
            signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command: exit 0 on success, 2 with `lowbit CMD: error: ...` for an error the user
    can act on, 130 with one line on Ctrl-C; a command may return its own status (sweep: 1
    when points failed)."""
    from lowbit.kernels.dispatch import schedule_cpu_for_memory

    parser = build_parser()
    args = parser.parse_args(argv)
    schedule_cpu_for_memory()
    interrupts = _Interrupts()
    try:
        with interrupts.installed():
            code = args.func(args)
    except KeyboardInterrupt:
        interrupts.pending = False
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = error_message(err)
        if message is None:
            raise
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
