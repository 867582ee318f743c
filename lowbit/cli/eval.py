"""`lowbit eval`: perplexity (and KL / top-1 against --ref) of a model over non-overlapping windows
of a text, under a named scoring convention."""

from __future__ import annotations

import math
import resource
import time

from lowbit import checkpoint
from lowbit.cli.output import emit

HELP = "perplexity (and KL against --ref) over non-overlapping windows of a text"


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="registered name, GGUF path or quantized directory")
    parser.add_argument("--text", default="pydoc", help="'pydoc' (the embedded corpus) or a text file")
    parser.add_argument("--split", default=None, choices=("all", "calibration", "evaluation"),
                        help="which tokens of the text: all (from its first token), or the calibration / "
                             "evaluation half; default: evaluation for pydoc, all for a file")
    parser.add_argument("--score", default="all", choices=("all", "second-half"),
                        help="positions scored per window: all after the first (GPTQ convention, default) or "
                             "the second half only (llama.cpp's llama-perplexity)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=None, help="number of windows (default: all)")
    parser.add_argument("--ref", default=None, help="reference model for KL divergence and top-1 agreement")
    parser.add_argument("--runtime", default="packed", choices=("packed", "dequant"),
                        help="a quantized checkpoint's layers, or a GGUF's Q4_0/Q4_1/Q8_0 tensors: packed (codes or "
                             "the file's blocks in memory, packed matmul; default) or dequant (weights dequantized "
                             "once into float layers: fake-quant, for research)")
    parser.add_argument("--activations", default="f32", choices=("f32", "int8"),
                        help="inputs of the packed/GGUF layers: f32 (default) or int8 (rounded per block as ggml "
                             "does: faster decode GEMVs, a small rounding of x; not for nf4/fp4 codes)")


# Arrays of a saved quantized layer that are not its weight (codes, scales, offsets).
_NOT_WEIGHT = ("bias", "input_scale", "act_param", "act_scale", "act_threshold")


def _saved_layer_bits(meta: dict, sizes: dict[str, int]) -> tuple[int, int]:
    """(bits, weights) of one saved quantized layer from its meta and {array: bytes}."""
    from lowbit.nn.contraction import contraction_from_description

    if "layer" in meta:  # a holder (static activation quantization) of one packed layer
        inner = {k[len("layer."):]: v for k, v in sizes.items() if k.startswith("layer.")}
        return _saved_layer_bits(meta["layer"], inner)
    bits = 8 * sum(n for name, n in sizes.items() if name not in _NOT_WEIGHT)
    if "contraction" in meta:
        contraction = contraction_from_description(meta["contraction"])
        return bits, contraction.in_features * contraction.out_features
    return bits, sizes["codes"]  # int8 W8A8 / LLM.int8() codes: one byte per weight


def linear_bits_per_weight(name_or_path) -> float | None:
    """Bits per weight of the quantized linears, scales and offsets included (not biases):
    a checkpoint's saved quantized layers, or a GGUF's quantized block matrices (the file's
    own types); None when there are none (or the GGUF is not on disk)."""
    from pathlib import Path

    from lowbit.models.registry import MODELS, model_path

    bits = weights = 0
    if Path(name_or_path).expanduser().is_dir():
        saved = checkpoint.read_meta(name_or_path)
        index = saved["arrays"]
        for path, entry in saved["layers"].items():
            sizes = {name: index[f"layers/{path}/{name}"]["nbytes"] for name in entry["arrays"]}
            layer_bits, layer_weights = _saved_layer_bits(entry["meta"], sizes)
            bits, weights = bits + layer_bits, weights + layer_weights
    else:
        from gguf import GGMLQuantizationType

        from lowbit.models.gguf.reader import open_gguf

        path = Path(name_or_path).expanduser()
        if str(name_or_path) in MODELS:
            path = model_path(str(name_or_path))
        if not path.is_file():
            return None
        floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
        for tensor in open_gguf(path).tensors:
            if tensor.name.startswith("blk.") and len(tensor.shape) == 2 \
                    and tensor.tensor_type not in floats:
                bits, weights = bits + 8 * int(tensor.n_bytes), weights + int(tensor.n_elements)
    return bits / weights if weights else None


def run(args) -> None:
    from lowbit.data.corpus import corpus_tokens, default_split
    from lowbit.eval import kl_divergence, perplexity

    if args.ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens, got {args.ctx}")
    if args.windows is not None and args.windows < 1:
        raise ValueError(f"--windows must be a positive integer, got {args.windows}")
    split = args.split or default_split(args.text)
    model, tokenizer = checkpoint.load_model_and_tokenizer(args.model, args.runtime, getattr(args, "activations", "f32"))
    tokens, first_token = corpus_tokens(tokenizer, args.text, split)
    start = time.perf_counter()
    scoring = {"ctx": args.ctx, "windows": args.windows, "progress": not args.quiet, "score": args.score}
    if args.ref:
        ref_model, _ = checkpoint.load_model_and_tokenizer(args.ref)
        r = kl_divergence(model, ref_model, tokens, **scoring)
        info = {"ppl": r.ppl, "ref_ppl": r.ref_ppl, "kl": r.kl, "top1": r.top1, "tokens": r.tokens_scored,
                "windows": r.windows}
    else:
        r = perplexity(model, tokens, **scoring)
        info = {"ppl": r.ppl, "tokens": r.tokens_scored, "windows": r.windows}
    # What was scored: windows of ctx tokens back to back from token first_token of the text's
    # token stream, each scored under the convention `score`.
    info.update(score=args.score, split=split, first_token=first_token,
                bits_per_weight=linear_bits_per_weight(args.model))
    values = {key: info[key] for key in ("ppl", "ref_ppl", "kl") if key in info}
    if not all(math.isfinite(value) for value in values.values()):
        raise ValueError(f"the evaluation of {args.model} is not finite ({values}): the model "
                         "computes NaN or inf, which is not reported as a result")
    seconds = time.perf_counter() - start
    info.update(model=args.model, runtime=args.runtime, text=args.text, ctx=args.ctx, seconds=round(seconds, 2),
                tokens_per_s=round(info["windows"] * args.ctx / seconds, 1), peak_rss_mb=round(peak_rss_mb(), 1))
    emit(args, info, [info])
