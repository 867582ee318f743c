"""QLoRA evidence on SmolLM2-135M: 4-bit data types by RTN perplexity, the worst-scored pydoc
topics as a held-apart domain, and fine-tuning it with QLoRA vs LoRA on the float base vs full
float fine-tuning (each in its own process, so peak RSS is its own). One command:

    PYTHONPATH=. .venv/bin/python papers/qlora/run.py [formats|domain|finetune|all]

Rows go to results/qlora/*.jsonl (printed as tables); the domain text to papers/qlora/domain.txt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "qlora"
DOMAIN = Path(__file__).resolve().parent / "domain.txt"
FORMATS = ("float", "int4:g64", "fp4:g64", "fp4:g64:dq", "nf4:g64", "nf4:g64:dq")
BLOCK_LINEARS = r"layers\.\d+\..*"
EVAL_CTX, EVAL_WINDOWS = 512, 8
TOPIC_TOKENS = 128  # each pydoc topic is scored on its first 128 tokens
DOMAIN_TOKENS = 24_000
RUNS = {  # name -> lowbit finetune arguments
    "qlora": ["--base", "nf4:g64:dq"],
    "qlora-loftq": ["--base", "nf4:g64:dq", "--init", "loftq"],
    "lora-float": ["--base", "float"],
    "full-float": ["--method", "full", "--base", "float", "--lr", "1e-4"],
}
FINETUNE = ["--model", "smollm2-135m", "--lora-rank", "16", "--lora-alpha", "16", "--steps", "30",
            "--batch-size", "4", "--seq-len", "64", "--eval-windows", "32", "--lr", "1e-3", "--seed", "0"]


def _print_rows(rows: list[dict]) -> None:
    from lowbit.cli.output import print_table

    print_table(rows)


def run_formats() -> list[dict]:
    """RTN of every block linear with each 4-bit format (groups of 64 along K): perplexity on
    the first EVAL_WINDOWS windows of EVAL_CTX tokens of the pydoc evaluation half."""
    import numpy as np

    from lowbit import ptq
    from lowbit.data.corpus import load_text, split_tokens
    from lowbit.eval import perplexity
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model
    from lowbit.models.tokenizer import Tokenizer
    from lowbit.nn import QuantRule

    path = resolve_model("smollm2-135m")
    tokens = split_tokens(np.asarray(Tokenizer.from_gguf(path).encode(load_text("pydoc")), np.int32))[1]
    rows = []
    for spec in FORMATS:
        model, _ = load_gguf_model(path)  # a fresh float model each time (the last one is dropped first)
        bits = 32.0
        if spec != "float":
            result = ptq.quantize(model, QuantRule(path=BLOCK_LINEARS, weight_spec=spec), method="rtn")
            bits = result.bits_per_weight
        r = perplexity(model, tokens, ctx=EVAL_CTX, windows=EVAL_WINDOWS)
        rows.append({"weights": spec, "bits_per_weight": round(bits, 4), "ppl": round(r.ppl, 4),
                     "tokens_scored": r.tokens_scored})
        print(json.dumps(rows[-1]), flush=True)
        del model
    _write("formats", rows)
    return rows


def run_formats_trained(config_path: str) -> list[dict]:
    """The same RTN formats on the float Llama trained here (experiments/qat/float_smollm2_vocab.toml,
    near-Gaussian weights), restored from its newest checkpoint; perplexity over all its held-out
    windows (the last 10% of the pydoc tokens, windows of its training length)."""
    from lowbit import ptq
    from lowbit.eval import perplexity
    from lowbit.nn import QuantRule
    from lowbit.train.config import load_config
    from lowbit.train.loop import Trainer

    config = load_config(config_path)
    seq = config.train.seq_len
    rows = []
    for spec in FORMATS:
        trainer = Trainer(config, resume=True)  # a fresh copy of the trained model each time
        if trainer.step == 0:
            raise SystemExit(f"no checkpoint in {config.train.checkpoint_dir}: train first")
        model, step, tokens = trainer.model(), trainer.step, trainer.eval_tokens
        trainer.close()
        del trainer
        bits = 32.0
        if spec != "float":
            result = ptq.quantize(model, QuantRule(path=BLOCK_LINEARS, weight_spec=spec), method="rtn")
            bits = result.bits_per_weight
        r = perplexity(model, tokens, ctx=seq, windows=tokens.size // seq)
        rows.append({"weights": spec, "bits_per_weight": round(bits, 4), "ppl": round(r.ppl, 4),
                     "tokens_scored": r.tokens_scored, "trained_steps": step})
        print(json.dumps(rows[-1]), flush=True)
        del model
    _write("formats_trained", rows)
    return rows


def run_domain() -> list[dict]:
    """Score every pydoc topic's first TOPIC_TOKENS tokens with the float model; the worst-scored
    topics (highest mean loss), in that order, until DOMAIN_TOKENS tokens, become domain.txt."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from pydoc_data.topics import topics

    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model
    from lowbit.models.tokenizer import Tokenizer
    from lowbit.train.loop import next_token_nll

    path = resolve_model("smollm2-135m")
    tokenizer = Tokenizer.from_gguf(path)
    model, _ = load_gguf_model(path)
    forward = jax.jit(lambda batch: next_token_nll(model(batch), batch))
    names = sorted(topics)
    encoded = {name: np.asarray(tokenizer.encode(topics[name]), np.int32) for name in names}
    scored = [name for name in names if encoded[name].size >= TOPIC_TOKENS]
    losses = {}
    for start in range(0, len(scored), 8):
        chunk = scored[start:start + 8]
        batch = np.stack([encoded[n][:TOPIC_TOKENS] for n in chunk] +
                         [encoded[chunk[0]][:TOPIC_TOKENS]] * (8 - len(chunk)))
        nll = np.asarray(forward(jnp.asarray(batch))).mean(axis=1)
        losses.update({name: float(nll[i]) for i, name in enumerate(chunk)})
    ranked = sorted(losses, key=losses.get, reverse=True)
    chosen, total = [], 0
    for name in ranked:
        if total >= DOMAIN_TOKENS:
            break
        chosen.append(name)
        total += encoded[name].size
    DOMAIN.write_text("\n\n".join(topics[name] for name in chosen) + "\n", encoding="utf-8")
    rows = [{"topic": name, "first_128_token_loss": round(losses[name], 4), "tokens": int(encoded[name].size),
             "in_domain": name in chosen} for name in ranked]
    _write("domain", rows)
    mean_all = float(np.mean(list(losses.values())))
    print(f"scored {len(losses)} topics (mean loss {mean_all:.3f}); domain: {len(chosen)} topics, {total} tokens, "
          f"mean loss {np.mean([losses[n] for n in chosen]):.3f} -> {DOMAIN.relative_to(ROOT)}")
    return rows


def run_finetune(names: list[str], parallel: bool = False) -> list[dict]:
    """Each fine-tune in its own `lowbit finetune` process (fresh output directory; all at once
    with parallel, which shares the CPU between them); the JSON each prints becomes one row."""
    if not DOMAIN.is_file():
        raise SystemExit(f"{DOMAIN} is missing: run `run.py domain` first")
    started = {}
    for name in names:
        out = RESULTS / "runs" / name
        command = [sys.executable, "-m", "lowbit.cli", "finetune", *FINETUNE, *RUNS[name], "--data", str(DOMAIN),
                   "--out", str(out), "--no-resume", "--json", "--quiet"]
        print("$", " ".join(command[1:]), flush=True)
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started[name] = (process, time.perf_counter())
        if not parallel:
            process.wait()
    rows = []
    for name, (process, start) in started.items():
        stdout, stderr = process.communicate()
        if process.returncode:
            print(stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed ({process.returncode})")
        info = json.loads(stdout.strip().splitlines()[-1])
        history = info["history"]
        rows.append({"run": name, "base": info["base"], "trainable": info["trainable_parameters"],
                     "trainable_pct": round(100 * info["trainable_fraction"], 3),
                     "ppl_step0": history[0]["eval_ppl"], f"ppl_step{info['steps']}": history[-1]["eval_ppl"],
                     "train_loss_last": history[-1]["train_loss"],
                     "step_s_median": round(info["step_seconds_median"], 2),
                     "step_cpu_s_median": round(info["step_cpu_seconds_median"], 2),
                     "peak_rss_mb": round(info["peak_rss_mb"], 1),
                     **{f"{k}_mb": round(v, 1) for k, v in info["state_mb"].items()},
                     "wall_s": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    _write("finetune", rows, append=True)
    return rows


MEMORY_PROBE = """
import functools, json, statistics, sys
from lowbit.kernels.dispatch import schedule_cpu_for_memory
schedule_cpu_for_memory()  # as the lowbit CLI does
import lowbit.train.finetune as finetune
from lowbit.nn.lora import prepare_qlora
from lowbit.train.finetune import FinetuneConfig, FineTuner, load_source_model

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

base, method, impl, steps, data = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if impl == "dequant":  # the packed base forms each float W per call (prepare_qlora's former default)
    finetune.prepare_qlora = functools.partial(prepare_qlora, runtime="dequant")
config = FinetuneConfig.from_dict({"data": {"corpus": data}, "lora": {"base": base, "method": method},
                                   "train": {"steps": steps, "batch_size": 4, "seq_len": 64,
                                             "warmup_steps": 1, "eval_windows": 4}})
phases = {}
model = load_source_model("smollm2-135m", on_blocks=base != "float")  # as FineTuner loads it
phases["loaded"] = (rss_mb(), peak_mb())
tuner = FineTuner(config, model=model, resume=False)
del model
phases["adapters_added"] = (rss_mb(), peak_mb())
tuner.train_step()
phases["first_step"] = (rss_mb(), peak_mb())
for _ in range(steps - 1):
    tuner.train_step()
phases["last_step"] = (rss_mb(), peak_mb())
print(json.dumps({"base": base, "method": method, "impl": impl, "steps": steps,
                  "frozen_mb": tuner.memory_bytes()["frozen"] / 2**20,
                  "step_s_median": statistics.median(tuner.step_seconds[1:]),
                  "step_cpu_s_median": statistics.median(tuner.step_cpu_seconds[1:]),
                  "phases": {k: {"rss_mb": round(a, 1), "peak_mb": round(b, 1)} for k, (a, b) in phases.items()}}))
"""

MEMORY_RUNS = {"qlora": ("nf4:g64:dq", "lora", "default"), "qlora-dequant": ("nf4:g64:dq", "lora", "dequant"),
               "lora-float": ("float", "lora", "default"), "full-float": ("float", "full", "default")}


def run_memory(steps: int = 4, names=tuple(MEMORY_RUNS)) -> list[dict]:
    """Peak and current RSS and step times of QLoRA (nf4:g64:dq through prepare_qlora's default
    packed matmul, and with a float W formed per call), LoRA on the float base and full fine-tuning,
    each in its own process: after loading the model (QLoRA: the GGUF on its blocks with a float
    embedding), after adding the adapters (QLoRA: quantizing), after the first (compiling) step and
    after the last; step times are medians over the steps after the first."""
    rows = []
    for base, method, impl in (MEMORY_RUNS[name] for name in names):
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, base, method, impl, str(steps), str(DOMAIN)],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"memory probe for {base} {method} {impl} failed ({done.returncode})")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        row = {"base": base, "method": method, "impl": impl, "frozen_mb": round(info["frozen_mb"], 1),
               "step_s": round(info["step_s_median"], 2), "step_cpu_s": round(info["step_cpu_s_median"], 2)}
        for phase, values in info["phases"].items():
            row[f"{phase}_rss_mb"], row[f"{phase}_peak_mb"] = values["rss_mb"], values["peak_mb"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write("memory", rows, append=True)
    return rows


STEP_TEMP_PROBE = """
import json, sys
from lowbit.kernels.dispatch import schedule_cpu_for_memory
schedule_cpu_for_memory()  # as the lowbit CLI does
import jax
from flax import nnx
from lowbit.models.llama import Llama, LlamaConfig
import functools
import lowbit.train.finetune as finetune
from lowbit.nn.lora import prepare_qlora
from lowbit.train.finetune import FinetuneConfig, FineTuner, _finetune_step, load_source_model
from lowbit.train.loop import optimizer_key

model_name, base, method, data, impl = sys.argv[1:6]
if model_name == "small":  # d_model 512, 4 blocks: 52 MB of f32 block linears
    model = Llama(LlamaConfig(vocab_size=49152, d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=64,
                              ffn_dim=1408, max_seq_len=512), rngs=nnx.Rngs(0))
else:
    model = load_source_model(model_name)
lora = {"base": base, "method": method}
if impl == "dequant":  # the packed base forms each float W per call (prepare_qlora's former default)
    finetune.prepare_qlora = functools.partial(prepare_qlora, runtime="dequant")
elif impl != "default":  # the packed base through packed_matmul with this impl
    finetune.prepare_qlora = functools.partial(prepare_qlora, impl=impl)
config = FinetuneConfig.from_dict({"data": {"corpus": data}, "lora": lora,
                                   "train": {"steps": 2, "batch_size": 4, "seq_len": 64, "warmup_steps": 1,
                                             "eval_windows": 4}})
tuner = FineTuner(config, model=model, resume=False)
del model
args = (tuner.graphdef, optimizer_key(tuner.config.train), tuner._trained, tuner.params, tuner.counts, tuner.rest,
        tuner.opt_state, tuner._put(tuner._batch(0)), jax.numpy.float32(1e-3))
stats = _finetune_step.lower(*args).compile().memory_analysis()
print(json.dumps({"model": model_name, "base": base, "method": method, "impl": impl,
                  "temp_mb": stats.temp_size_in_bytes / 1e6, "argument_mb": stats.argument_size_in_bytes / 1e6,
                  "output_mb": stats.output_size_in_bytes / 1e6, "frozen_mb": tuner.memory_bytes()["frozen"] / 1e6}))
"""


def run_step_temp(model_name: str, impls: list[str]) -> list[dict]:
    """XLA's own accounting of the compiled fine-tuning step (compile only, no step runs): temporary
    bytes of QLoRA (nf4:g64:dq; impls: "default" = prepare_qlora's, "dequant" = a float W formed per
    call, or a packed_matmul impl), LoRA on the float base and full fine-tuning, each compiled in its
    own process."""
    runs = [("nf4:g64:dq", "lora", impl) for impl in impls] + [("float", "lora", "default"),
                                                               ("float", "full", "default")]
    rows = []
    for base, method, impl in runs:
        done = subprocess.run([sys.executable, "-c", STEP_TEMP_PROBE, model_name, base, method, str(DOMAIN), impl],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"step-temp probe for {base} {method} {impl} failed ({done.returncode})")
        rows.append({k: round(v, 1) if isinstance(v, float) else v
                     for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()})
        print(json.dumps(rows[-1]), flush=True)
    _write("step_temp", rows, append=True)
    return rows


def _write(name: str, rows: list[dict], append: bool = False) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a" if append else "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all", choices=("formats", "formats-trained", "domain", "finetune", "memory", "step-temp", "all"))
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), help="fine-tunes to run")
    parser.add_argument("--parallel", action="store_true", help="run the fine-tunes at the same time")
    parser.add_argument("--trained-config", default=str(ROOT / "experiments/qat/float_smollm2_vocab.toml"),
                        help="formats-trained: the training config of the float model")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of each memory probe")
    parser.add_argument("--memory-runs", nargs="*", default=list(MEMORY_RUNS), choices=list(MEMORY_RUNS),
                        help="memory: the probes to run")
    parser.add_argument("--model", default="small", help="step-temp: 'small' (a 4-block Llama) or a model name")
    parser.add_argument("--impls", nargs="*", default=["default"], help="step-temp: QLoRA base impls to compile")
    args = parser.parse_args()
    if args.part in ("formats", "all"):
        _print_rows(run_formats())
    if args.part == "formats-trained":  # needs the trained model: not part of "all"
        _print_rows(run_formats_trained(args.trained_config))
    if args.part in ("domain", "all"):
        run_domain()
    if args.part in ("finetune", "all"):
        _print_rows(run_finetune(args.runs, args.parallel))
    if args.part == "step-temp":
        _print_rows(run_step_temp(args.model, args.impls))
    if args.part in ("memory", "all"):
        _print_rows(run_memory(args.memory_steps, args.memory_runs))


if __name__ == "__main__":
    main()
