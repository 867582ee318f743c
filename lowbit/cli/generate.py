"""`lowbit generate`: greedy or sampled text from a prompt; with KV-cache options (--kv, --kv-policy,
--batch-file, ...) one prompt or a file of prompts served by the batched, paged generator; with
--draft and --gamma, speculative decoding."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from lowbit import checkpoint
from lowbit.decode.engine import BatchedGenerator, Request
from lowbit.kernels.gguf_matmul import GGUF_BLOCKS
from lowbit.kvcache.layout import LAYOUT_NAMES, parse_layout
from lowbit.kvcache.policy import parse_policy

HELP = "generate text (greedy by default)"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--prompt-file", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runtime", default="packed", choices=("packed", "dequant"),
                        help="packed (a GGUF's own blocks or a checkpoint's codes; default) or dequant (float weights)")
    parser.add_argument("--activations", default="auto", choices=("auto", "f32", "int8"),
                        help="inputs of the packed/GGUF layers: int8 (rounded per block as ggml does: faster "
                             "decode GEMVs, a small rounding of x; nf4/fp4 layers keep f32) with an f16 KV cache "
                             "as llama.cpp's; f32 with the model's own cache (the float product's tokens); auto "
                             "(default): on CPU, int8 in the decode GEMVs and f32 in the prefill GEMMs (the "
                             "faster of each) with an f16 cache; elsewhere f32. The f16 cache is the contiguous "
                             "and speculative paths'; the --kv generator keeps --kv (default f32)")
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--draft", default=None, metavar="rtn:SPEC|PATH|layers:N",
                      help="draft model: rtn:SPEC (e.g. rtn:int4:g64, or a GGUF block type such as rtn:q8_0: the "
                           "target's block linears rounded to SPEC and packed in-process, one matrix at a time, "
                           "sharing its embedding, norms and head), "
                           "layers:N (the target's first N blocks and its head, sharing its weights), a checkpoint "
                           "directory (e.g. made by `lowbit quantize`), a GGUF path or a registered model name with "
                           "the target's tokenizer")
    spec.add_argument("--draft-activations", default="f32", choices=("f32", "int8"),
                      help="inputs of an rtn: or checkpoint draft's packed layers: int8 makes the draft cheaper and "
                           "leaves the output exactly the target's (default f32; a layers:N draft shares the "
                           "target's layers and their --activations)")
    spec.add_argument("--draft-embed", default="keep", choices=("keep", "q8_0"),
                      help="the draft's token embedding and tied head: keep (the target's shared table for rtn: "
                           "and layers:N drafts, a checkpoint's own; default) or q8_0 (a Q8_0 copy of its own, "
                           "+30 MB for SmolLM2, a head that reads a quarter of the f32 bytes)")
    spec.add_argument("--gamma", type=int, default=4, help="draft tokens per target pass (default 4; the most "
                                                           "with --gamma-adaptive)")
    spec.add_argument("--gamma-adaptive", type=float, default=0.0, metavar="THRESHOLD",
                      help="adaptive gamma: stop a round's drafting after a token whose draft probability is below "
                           "THRESHOLD in [0, 1) (default 0: always --gamma tokens)")
    group = parser.add_argument_group("KV cache")
    group.add_argument("--kv", default=None, metavar="LAYOUT",
                       help=f"KV cache storage: {', '.join(LAYOUT_NAMES)}; options :gN (group), :rN "
                            "(KIVI residual), :swap (KIVI axes swapped). Default: the model's dense cache")
    group.add_argument("--kv-policy", default=None, metavar="POLICY",
                       help="which tokens the cache keeps: full, window:N, sinks:S,window:N, h2o:RATIO, "
                            "heavy:H,recent:R")
    group.add_argument("--batch-file", default=None, metavar="FILE",
                       help="a text file with one prompt per line, served together from one paged pool")
    group.add_argument("--slots", type=int, default=8, help="sequences decoded per step (default 8)")
    group.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default 16)")
    group.add_argument("--num-pages", type=int, default=None,
                       help="pages in the pool (default: every slot at full length)")


def wants_kv_generation(args) -> bool:
    """Whether the command line asked for the KV-cache generator (any of its options given)."""
    return any(getattr(args, name, None) is not None for name in ("kv", "kv_policy", "batch_file"))


def check_generate_arguments(args) -> None:
    """The checks of `lowbit generate` that need no model: token count, temperature and, for the
    KV generator, the layout, policy and pool sizes (ValueError naming the option)."""
    max_new = getattr(args, "max_new_tokens", 64)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {max_new!r}")
    temperature = getattr(args, "temperature", 0.0)
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    gamma = getattr(args, "gamma", 4)
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"--gamma must be a positive integer (draft tokens per target pass), got {gamma!r}")
    threshold = getattr(args, "gamma_adaptive", 0.0)
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"--gamma-adaptive must be a probability threshold in [0, 1) (0 = off), got {threshold!r}")
    draft = getattr(args, "draft", None)
    if draft is not None:
        if draft.startswith("layers:") and not draft[len("layers:"):].isdigit():
            raise ValueError(f"--draft layers:N needs a positive integer N, got {draft!r}")
        if draft.startswith("rtn:") and draft[len("rtn:"):].upper() not in GGUF_BLOCKS:
            from lowbit.core.spec import QuantSpec
            try:
                QuantSpec.parse(draft[len("rtn:"):])
            except ValueError as error:
                raise ValueError(f"--draft rtn:SPEC needs a weight spec such as rtn:int4:g64 or a GGUF block "
                                 f"type ({', '.join(GGUF_BLOCKS)}): {error}") from None
        if draft.startswith("layers:") and getattr(args, "draft_activations", "f32") != "f32":
            raise ValueError("--draft-activations: a layers:N draft runs the target's own layers; set --activations")
        if getattr(args, "kv_policy", None) not in (None, "full"):
            raise ValueError(f"--draft needs the full KV policy (rejected draft tokens are rolled back), "
                             f"got --kv-policy {args.kv_policy}")
    if not wants_kv_generation(args):
        return
    parse_layout(args.kv or "f32")
    parse_policy(args.kv_policy)
    for option in ("slots", "page_size", "num_pages"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be a positive integer, got {value}")


def resolve_activations(model, requested: str) -> str:
    """The activations `lowbit generate` runs the loaded model's packed/GGUF layers on. "auto" on CPU:
    the layers' "auto" mode (int8 in the native decode GEMVs, f32 in the prefill GEMMs: the faster
    of each, benchmarks/RESULTS.md) where the native kernels are built and some layer takes int8,
    else "f32"; on other backends "f32"."""
    from lowbit.nn import set_activations

    if requested != "auto":
        return requested
    from lowbit.kernels.native import native_available

    if jax.default_backend() == "cpu" and native_available() and set_activations(model, "auto") > 0:
        return "auto"
    return "f32"


def cache_layout(activations: str) -> str | None:
    """The contiguous KV cache that goes with the activations: f16 (llama.cpp's default cache) with
    int8 decode products, the model's own dtype (None) with f32, so f32 gives the float model's tokens."""
    return None if activations == "f32" else "f16"


def read_prompts(args) -> list[str]:
    """The prompts: the lines of --batch-file (blank lines skipped), else --prompt-file or --prompt."""
    batch_file = getattr(args, "batch_file", None)
    if batch_file:
        path = Path(batch_file)
        if not path.is_file():
            raise FileNotFoundError(f"--batch-file not found: {path}")
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--batch-file {path} holds no prompts (one per line)")
        return prompts
    prompt_file = getattr(args, "prompt_file", None)
    if prompt_file and not Path(prompt_file).is_file():
        raise FileNotFoundError(f"--prompt-file not found: {prompt_file}")
    prompt = Path(prompt_file).read_text(encoding="utf-8") if prompt_file else getattr(args, "prompt", None)
    if not prompt:
        raise ValueError("give a prompt with --prompt TEXT, --prompt-file FILE or --batch-file FILE")
    return [prompt]


def run(args) -> None:
    from lowbit.decode.compilation import CompileMeter, enable_compilation_cache
    from lowbit.decode import generate

    check_generate_arguments(args)  # before the model loads
    prompt = read_prompts(args)[0]
    enable_compilation_cache()
    start = time.perf_counter()
    requested = getattr(args, "activations", "auto")
    model, tokenizer = checkpoint.load_model_and_tokenizer(args.model, args.runtime,
                                                           "f32" if requested == "auto" else requested)
    activations = resolve_activations(model, requested)
    load_s = time.perf_counter() - start
    if getattr(args, "draft", None):
        run_speculative(args, model, tokenizer, load_s=load_s, cache=cache_layout(activations))
        return
    with CompileMeter() as meter:
        if wants_kv_generation(args):
            run_generate_kv(args, model, tokenizer, meter=meter, load_s=load_s)
            return
        ids = tokenizer.encode(prompt)
        key = jax.random.key(args.seed) if args.temperature > 0 else None
        stamps = {}
        new = generate(model, ids, args.max_new_tokens, temperature=args.temperature, key=key,
                       eos_id=tokenizer.eos_id, layout=cache_layout(activations), timings=stamps)
    new = [int(t) for t in new.reshape(-1)]
    seconds = stamps["end"] - stamps["start"]
    prefill_s = stamps["first_token"] - stamps["start"]
    decode_s = stamps["end"] - stamps["first_token"]
    prefill_compile, decode_compile = meter.seconds_of("prefill"), meter.seconds_of("decode")
    info = {"tokens": new, "text": tokenizer.decode(new), "activations": activations,
            "cache": stamps["layout"], "prompt_tokens": len(ids),
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


def run_generate_kv(args, model, tokenizer, meter=None, load_s: float | None = None) -> dict:
    """Generate for every prompt with the requested cache; prints a table (or JSON with --json) and
    returns the same information as a dict. meter: a running CompileMeter, whose compilation
    seconds are reported and taken out of the prefill and decode rates."""
    check_generate_arguments(args)
    layout = parse_layout(args.kv or "f32")
    policy = parse_policy(args.kv_policy)
    prompts = read_prompts(args)
    ids = [tokenizer.encode(p) for p in prompts]
    if any(not x for x in ids):
        raise ValueError("a prompt encodes to no tokens")
    max_new = getattr(args, "max_new_tokens", 64)
    temperature = float(getattr(args, "temperature", 0.0))
    key = jax.random.key(getattr(args, "seed", 0))
    requests = [Request(x, max_new, temperature, jax.random.fold_in(key, i), tokenizer.eos_id)
                for i, x in enumerate(ids)]
    max_len = max(len(x) for x in ids) + max_new
    generator = BatchedGenerator(model, layout, policy, slots=min(args.slots, len(requests)),
                                 max_len=max_len, num_pages=args.num_pages, page_size=args.page_size)
    quiet = getattr(args, "quiet", False) or not sys.stderr.isatty()
    completions = generator.generate(requests, progress=not quiet)
    stats = generator.stats
    compile_prefill = meter.seconds_of("prefill") if meter else 0.0
    compile_decode = meter.seconds_of("decode") if meter else 0.0
    decoded = stats.generated_tokens - stats.prefills
    config = model.config
    info = {
        "kv": layout.name, "policy": str(generator.cache.policy),
        "kv_bytes_per_token_per_layer": layout.bytes_per_token(config.n_kv_heads, config.head_dim,
                                                               generator.cache.page_size),
        "results": [{"prompt": p, "text": tokenizer.decode(c.tokens), "tokens": c.tokens,
                     "prompt_tokens": c.prompt_tokens, "finish_reason": c.finish_reason}
                    for p, c in zip(prompts, completions)],
        "stats": {"generated_tokens": stats.generated_tokens, "seconds": round(stats.seconds, 3),
                  "tokens_per_s": round(stats.tokens_per_s, 2), "decode_steps": stats.decode_steps,
                  "mean_batch": round(stats.mean_batch, 2), "preemptions": stats.preemptions,
                  "peak_pages": stats.peak_pages, "mean_kv_utilization": round(stats.mean_utilization, 4),
                  "shared_prefix_tokens": stats.shared_prefix_tokens,
                  "first_token_s": round(stats.first_token_seconds, 3),
                  "compile_s": round(meter.seconds, 3) if meter else None,
                  "prefill_tok_s": round(stats.prefill_tokens / max(stats.prefill_seconds - compile_prefill, 1e-9), 1),
                  "decode_tok_s": (round(decoded / max(stats.decode_seconds - compile_decode, 1e-9), 2)
                                   if decoded else None),
                  "load_s": None if load_s is None else round(load_s, 3)},
    }
    if getattr(args, "json", False):
        print(json.dumps(info))
    else:
        for i, result in enumerate(info["results"]):
            print(f"--- [{i}] {result['finish_reason']}, {len(result['tokens'])} tokens")
            print(result["prompt"] + result["text"])
        s = info["stats"]
        print(f"[kv {info['kv']}, policy {info['policy']}: {s['generated_tokens']} tokens in {s['seconds']} s "
              f"({s['tokens_per_s']} tokens/s incl. compile), mean batch {s['mean_batch']}, "
              f"KV utilization {s['mean_kv_utilization']:.1%}, {s['preemptions']} preemptions]",
              file=sys.stderr)
    return info


def load_draft(spec: str, target, tokenizer, runtime: str = "packed", activations: str = "f32",
               embed: str = "keep"):
    """The draft of --draft: rtn:SPEC (a low-bit self-draft quantized from the target's weights in
    process, sharing its embedding and head), layers:N (a self-draft sharing the target's weights)
    or a model path or name whose tokenizer encodes like the target's; `activations` for the
    packed layers of the first and last kinds; embed "q8_0" gives the draft a Q8_0 embedding and
    tied head of its own (the target keeps its table)."""
    from lowbit.decode.speculative import layer_draft, quantized_draft
    from lowbit.ptq.embeddings import quantize_embeddings

    if embed not in ("keep", "q8_0"):
        raise ValueError(f"--draft-embed must be keep or q8_0, got {embed!r}")
    if spec.startswith("rtn:"):
        draft = quantized_draft(target, spec[len("rtn:"):], activations)
    elif spec.startswith("layers:"):
        draft = layer_draft(target, int(spec[len("layers:"):]))
    else:
        draft = _checkpoint_draft(spec, target, tokenizer, runtime, activations)
    if embed == "q8_0" and any(isinstance(node, nnx.Embed) for _, node in nnx.iter_graph(draft)):
        quantize_embeddings(draft, "Q8_0", activations=activations)
    return draft


def _checkpoint_draft(spec: str, target, tokenizer, runtime: str, activations: str):
    draft, draft_tokenizer = checkpoint.load_model_and_tokenizer(spec, runtime, activations)
    probe = "Speculative decoding: the draft must tokenize 123 words exactly like the target."
    if (draft.config.vocab_size != target.config.vocab_size
            or draft_tokenizer.encode(probe) != tokenizer.encode(probe)):
        raise ValueError(f"--draft {spec}: its tokenizer differs from the target's (vocabulary "
                         f"{draft.config.vocab_size} vs {target.config.vocab_size}); a draft needs the same tokenizer")
    return draft


def run_speculative(args, model, tokenizer, load_s: float | None = None, cache: str | None = None) -> dict:
    """Speculative generation of every prompt with --draft and --gamma; prints the texts (or JSON with
    --json) with acceptance_rate, target_calls, tokens and wall time. --batch-file prompts run one
    after another on paged caches, not batched: on this memory-bound CPU, batching is itself what
    speculation buys (one weight read for many tokens; the batched generator's decode phase gives
    1.9x at 4 sequences, 2.4x at 16, benchmarks/RESULTS.md), while speculation alone measured below
    1x here (papers/speculative), so rows advancing by different accepted counts are not worth it.
    cache: the KV layout when --kv is not given (as the plain path's, so greedy tokens agree; with
    --activations auto while the verify pass, gamma + 1 rows, stays on the int8 GEMV: gamma < 23)."""
    from lowbit.decode.speculative import SpeculativeDecoder, SpeculativeStats

    check_generate_arguments(args)
    prompts = read_prompts(args)
    draft = load_draft(args.draft, model, tokenizer, getattr(args, "runtime", "packed"),
                       getattr(args, "draft_activations", "f32"), getattr(args, "draft_embed", "keep"))
    decoder = SpeculativeDecoder(model, draft, args.gamma, layout=getattr(args, "kv", None) or cache,
                                 policy=getattr(args, "kv_policy", None),
                                 paged=getattr(args, "batch_file", None) is not None,
                                 page_size=getattr(args, "page_size", None),
                                 confidence_threshold=getattr(args, "gamma_adaptive", 0.0))
    total = SpeculativeStats()
    results = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("a prompt encodes to no tokens")
        new = decoder.generate(ids, args.max_new_tokens, temperature=float(args.temperature),
                               seed=args.seed + i, eos_id=tokenizer.eos_id)
        total.add(decoder.stats)
        results.append({"prompt": prompt, "tokens": [int(t) for t in new], "text": tokenizer.decode(new),
                        "prompt_tokens": len(ids), "acceptance_rate": round(decoder.stats.acceptance_rate, 4),
                        "target_calls": decoder.stats.target_calls, "seconds": round(decoder.stats.seconds, 3)})
    info = {"draft": args.draft, "gamma": args.gamma, "gamma_adaptive": getattr(args, "gamma_adaptive", 0.0),
            "tokens": total.tokens,
            "acceptance_rate": round(total.acceptance_rate, 4), "target_calls": total.target_calls,
            "tokens_per_target_call": round(total.tokens_per_call, 3), "drafted": total.drafted,
            "accepted": total.accepted, "seconds": round(total.seconds, 3),
            "tokens_per_s": round(total.tokens / total.seconds, 2) if total.seconds else None,
            "prefill_s": round(total.prefill_seconds, 3), "draft_s": round(total.draft_seconds, 3),
            "target_s": round(total.target_seconds, 3),
            "load_s": None if load_s is None else round(load_s, 3), "results": results}
    if getattr(args, "json", False):
        print(json.dumps(info))
    else:
        for result in results:
            print(result["prompt"] + result["text"])
        print(f"[{info['tokens']} tokens in {info['seconds']} s; draft {args.draft}, gamma {args.gamma}: "
              f"acceptance {info['acceptance_rate']:.1%}, {info['target_calls']} target passes, "
              f"{info['tokens_per_target_call']} tokens per pass]", file=sys.stderr)
    return info
