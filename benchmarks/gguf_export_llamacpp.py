"""A lowbit checkpoint exported to GGUF and run by llama.cpp: perplexity on the same windows in both
(positions 1..ctx-1 of each window scored, as lowbit.eval.perplexity does) and greedy tokens;
llama.cpp's perplexity also on an F32 export of the same model (same weights, no block types).

    python benchmarks/gguf_export_llamacpp.py --checkpoint DIR --type Q4_0 [TQ2_0 ...] \
        --workdir W --llamacpp-python /work/refvenv/bin/python [--windows 4] [--ctx 512] \
        [--new-tokens 32] [--heldout-fraction 0.5] [--f32-cache]

A model whose layers quantize their inputs (int8 per 256, llama.cpp's Q8_K: exported to TQ
types only) has its F32 export written from the same weights with float inputs, and lowbit's
perplexity is given both ways (`lowbit_ppl` with its input rounding, `lowbit_ppl_float_inputs`).

--lowbit-only stops after lowbit's side (export, perplexity, greedy tokens, kept in
W/lowbit.json); a later run with --reuse-lowbit does only llama.cpp's side on those files.

The llama.cpp side runs in a Python with llama-cpp-python (the `ref` extra), which may be another
virtual environment: this file re-runs itself there with --llamacpp-side (numpy and llama_cpp
only). Greedy: llama.cpp's argmax at every step given lowbit's prefix (one pass over prompt +
lowbit's tokens), on the exported file and on an F32 export of the same model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Four prompts of exactly 16 SmolLM2 tokens (as in tests/real_model/test_llamacpp_reference.py).
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def is_prime(n):\n    if n < 2:\n        return",
    "Once upon a time, there was a little robot who lived in a quiet village",
    "The for statement is used to iterate over the elements of a sequence (such as",
]


def llamacpp_side(request_path: str) -> None:
    """NLL sums over the windows and argmax/top-2 margins after each prefix, printed as JSON."""
    import llama_cpp
    import numpy as np

    request = json.loads(Path(request_path).read_text())
    cache = (dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
             if request.get("f32_cache") else {})
    out = {}
    for key, path in request["files"].items():
        llm = llama_cpp.Llama(path, n_ctx=request["ctx"], logits_all=True, n_threads=1,
                              n_threads_batch=1, verbose=False, **cache)
        total = 0.0
        for window in request["windows"]:
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[:len(window)], np.float64)
            peak = logits.max(axis=-1)
            lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
            picked = logits[np.arange(len(window) - 1), window[1:]]
            total += float(-(picked - lse[:-1]).sum())
        greedy = []
        for prompt, continuation in zip(request["prompts"], request["continuations"]):
            sequence = prompt + continuation
            llm.reset()
            llm.eval(sequence[:-1])
            logits = np.array(llm.scores[len(prompt) - 1:len(sequence) - 1])
            top2 = np.sort(logits, axis=-1)[:, -2:]
            greedy.append({"argmax": logits.argmax(axis=-1).tolist(),
                           "margin": (top2[:, 1] - top2[:, 0]).tolist()})
        out[key] = {"nll_sum": total, "greedy": greedy}
        llm.close()
    print(json.dumps(out))


@contextlib.contextmanager
def float_inputs(model):
    """The model's layers with their input quantization switched off (restored on exit)."""
    from flax import nnx

    from lowbit.nn.packed_layer import PackedLayer

    layers = [node for _, node in nnx.iter_graph(model)
              if isinstance(node, PackedLayer) and node.act_spec is not None]
    specs = [layer.act_spec for layer in layers]
    for layer in layers:
        layer.act_spec = None
    try:
        yield len(layers)
    finally:
        for layer, spec in zip(layers, specs):
            layer.act_spec = spec


def lowbit_side(args, workdir: Path) -> dict:
    """Export the checkpoint (each type asked for, and F32), lowbit's perplexity on the windows
    and its greedy tokens: the request llama.cpp's side answers."""
    import warnings

    import numpy as np

    import lowbit
    from lowbit.data.corpus import load_text, split_tokens, token_windows
    from lowbit.eval import perplexity
    from lowbit.export import model_and_source
    from lowbit.decode import generate
    from lowbit.models.tokenizer import Tokenizer

    model, source = model_and_source(args.checkpoint)
    tokenizer = Tokenizer.from_gguf(source)
    _, evaluation = split_tokens(np.asarray(tokenizer.encode(load_text()), np.int32),
                                 1.0 - args.heldout_fraction)
    windows = token_windows(evaluation, args.ctx, args.windows)
    start = time.perf_counter()
    files, exports = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for gguf_type in args.type:
            report = lowbit.export_gguf(model, workdir / f"model-{gguf_type}.gguf", gguf_type,
                                        source=source, force=True)
            types: dict[str, int] = {}
            for entry in report["tensors"]:
                types[entry["type"]] = types.get(entry["type"], 0) + 1
            files[gguf_type] = report["path"]
            exports[gguf_type] = {"file": report["path"], "bytes": report["bytes"],
                                  "tensor_types": types, "exact_tensors": report["exact_tensors"],
                                  "tensors": len(report["tensors"]),
                                  "weight_mse": report["weight_mse"]}
        with float_inputs(model) as quantized_inputs:
            files["F32"] = lowbit.export_gguf(model, workdir / "model-F32.gguf", "F32",
                                              source=source, force=True)["path"]
            ours_float = (perplexity(model, windows.reshape(-1), ctx=args.ctx,
                                     windows=args.windows).ppl if quantized_inputs else None)
    export_seconds = time.perf_counter() - start
    ours = perplexity(model, windows.reshape(-1), ctx=args.ctx, windows=args.windows)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    continuations = np.asarray(generate(model, np.asarray(prompts, np.int32), args.new_tokens))
    summary = {"checkpoint": args.checkpoint, "exports": exports,
               "layers_with_quantized_inputs": quantized_inputs,
               "warnings": sorted({str(w.message) for w in caught}),
               "export_seconds": round(export_seconds, 1), "ctx": args.ctx,
               "windows_count": args.windows, "heldout_fraction": args.heldout_fraction,
               "f32_cache": args.f32_cache, "tokens_scored": ours.tokens_scored,
               "lowbit_ppl": ours.ppl, "lowbit_ppl_float_inputs": ours_float}
    return {"ctx": args.ctx, "windows": windows.tolist(), "prompts": prompts,
            "continuations": continuations.tolist(), "report": summary, "files": files,
            "f32_cache": args.f32_cache}


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a lowbit checkpoint directory (lowbit quantize)")
    parser.add_argument("--type", nargs="+", default=["Q4_0"], help="GGUF types to export")
    parser.add_argument("--llamacpp-python", default=sys.executable)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--heldout-fraction", type=float, default=0.5,
                        help="windows from the last FRACTION of the pydoc tokens (default: the "
                             "second half, the evaluation split; 0.1 = a QAT run's held-out part)")
    parser.add_argument("--f32-cache", action="store_true",
                        help="llama.cpp's KV cache in F32 (default F16, llama.cpp's own default)")
    parser.add_argument("--workdir", default=None, help="where the GGUF files go (default: temp)")
    parser.add_argument("--lowbit-only", action="store_true")
    parser.add_argument("--reuse-lowbit", action="store_true")
    parser.add_argument("--llamacpp-side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llamacpp_side:
        llamacpp_side(args.llamacpp_side)
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gguf-export-"))
    workdir.mkdir(parents=True, exist_ok=True)
    request_path = workdir / "lowbit.json"
    if args.reuse_lowbit:
        request = json.loads(request_path.read_text())
        request["f32_cache"] = request["report"]["f32_cache"] = args.f32_cache
        request_path.write_text(json.dumps(request))
    else:
        request = lowbit_side(args, workdir)
        request_path.write_text(json.dumps(request))
    if args.lowbit_only:
        print(json.dumps({k: v for k, v in request.items()
                          if k not in ("windows", "prompts", "continuations")}, indent=1))
        return
    report, continuations = request["report"], request["continuations"]
    done = subprocess.run([args.llamacpp_python, __file__, "--llamacpp-side", str(request_path)],
                          capture_output=True, text=True, check=True)
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    llamacpp = {}
    for key, result in theirs.items():
        ppl = math.exp(result["nll_sum"] / report["tokens_scored"])
        ours = report["lowbit_ppl"]
        if key == "F32" and report["lowbit_ppl_float_inputs"] is not None:
            ours = report["lowbit_ppl_float_inputs"]  # the F32 file has float inputs
        rows = []
        for row, reference in zip(continuations, result["greedy"]):
            i = _first_difference(row, reference["argmax"])
            rows.append({"first_difference": i,
                         "matching_steps": sum(a == b for a, b in zip(row, reference["argmax"])),
                         "llamacpp_margin_there": None if i is None else reference["margin"][i]})
        llamacpp[key] = {"ppl": ppl, "lowbit_ppl_compared": ours,
                         "ppl_relative_difference": ours / ppl - 1, "greedy": rows}
    summary = {**report, "greedy_new_tokens": len(continuations[0]), "llamacpp": llamacpp}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
