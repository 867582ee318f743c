"""`lowbit finetune`: QLoRA (adapters on a frozen NF4 base, the default), LoRA on the float base, or
a full fine-tune, from a TOML config and/or flags, resumable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.cli.output import print_table, show_progress

HELP = ("fine-tune a model: QLoRA (adapters on a frozen NF4 base, the default), LoRA on the float base, "
        "or full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `finetune` options; each overrides the --config TOML's value."""
    parser.add_argument("--config", help="TOML file: [model] name, [data], [train], [lora] (unknown keys are errors)")
    parser.add_argument("--model", help="registered model or llama GGUF path (model.name; default smollm2-135m)")
    parser.add_argument("--base", help="the frozen base: a weight spec (QLoRA: nf4:g64:dq, the default) or 'float'")
    parser.add_argument("--method", choices=("lora", "full"),
                        help="lora: train adapters only (default); full: train every float weight (--base float)")
    parser.add_argument("--lora-rank", type=int, help="adapter rank r (default 16)")
    parser.add_argument("--lora-alpha", type=float, help="adapter scale numerator (scale alpha / r; default 16)")
    parser.add_argument("--lora-dropout", type=float, help="dropout on the adapter inputs (default 0.05)")
    parser.add_argument("--lora-path", help=r"regex over module paths to adapt (default: layers\.\d+\..*)")
    parser.add_argument("--init", choices=("zero", "loftq"), help="adapter initialization (default zero)")
    parser.add_argument("--data", help="'pydoc' or a UTF-8 text file (its last eval_fraction is held out)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default 128)")
    parser.add_argument("--eval-windows", type=int, help="held-out windows per evaluation (default 16)")
    parser.add_argument("--seed", type=int, help="batch order, adapter initialization and dropout seed")
    parser.add_argument("--out", help="output directory: checkpoints/ (resumable) and adapters/ at the end")
    parser.add_argument("--no-resume", action="store_true", help="start over even if --out holds checkpoints")
    parser.add_argument("--force", action="store_true",
                        help="resume even though run settings (lr, steps, data, ...) differ from the checkpoint's")


FINETUNE_OVERRIDES = {  # argument -> (section, key)
    "model": ("model", "name"), "base": ("lora", "base"), "method": ("lora", "method"),
    "lora_rank": ("lora", "rank"), "lora_alpha": ("lora", "alpha"), "lora_dropout": ("lora", "dropout"),
    "lora_path": ("lora", "path"), "init": ("lora", "init"), "data": ("data", "corpus"),
    "steps": ("train", "steps"), "lr": ("train", "lr"), "batch_size": ("train", "batch_size"),
    "seq_len": ("train", "seq_len"), "eval_windows": ("train", "eval_windows"), "seed": ("train", "seed"),
}


def finetune_config(args: argparse.Namespace):
    """The FinetuneConfig of the --config file (if any) with the command-line values over it."""
    from lowbit.files import read_toml
    from lowbit.train.finetune import FinetuneConfig

    tables = read_toml(args.config, "config file") if args.config else {}
    if not isinstance(tables, dict):
        raise ValueError(f"config file {args.config} must hold tables")
    tables = {name: dict(table) if isinstance(table, dict) else table for name, table in tables.items()}
    for argument, (section, key) in FINETUNE_OVERRIDES.items():
        value = getattr(args, argument, None)
        if value is not None:
            if not isinstance(tables.setdefault(section, {}), dict):
                raise ValueError(f"config section [{section}] must be a table")
            tables[section][key] = value
    if getattr(args, "steps", None) is not None and "warmup_steps" in tables.get("train", {}) \
            and tables["train"]["warmup_steps"] >= args.steps:
        tables["train"]["warmup_steps"] = args.steps // 10
    if args.out is not None:
        if not args.out:
            raise ValueError("--out must be a directory path")
        tables.setdefault("train", {})["checkpoint_dir"] = str(Path(args.out) / "checkpoints")
    if tables.get("lora", {}).get("method") == "full" and "base" not in tables["lora"]:
        tables["lora"]["base"] = "float"
    return FinetuneConfig.from_dict(tables)


def run(args: argparse.Namespace) -> None:
    finetune(args)


def finetune(args: argparse.Namespace) -> dict:
    """Fine-tune as `args` say (resuming from --out's checkpoints unless --no-resume); evaluates
    the held-out text before the first step and at the end; saves the adapters to OUT/adapters.
    Prints the history table (or JSON) and returns the summary."""
    import resource
    import statistics

    from lowbit.train.finetune import FineTuner

    if args.force and args.no_resume:
        raise ValueError("--force (resume with changed settings) and --no-resume exclude each other")
    config = finetune_config(args)
    resume = "force" if args.force else not args.no_resume
    tuner = FineTuner(config, resume=resume, progress=show_progress(args))
    resumed_from = tuner.step
    if tuner.step == 0:  # the held-out text under the (quantized) base, before any step
        tuner.history.append({"step": 0, "train_loss": None, "lr": 0.0, "tokens_per_s": None, **tuner.evaluate()})
    tuner.run()
    tuner.close()
    adapters = None
    if args.out and config.lora.method == "lora":
        from lowbit.nn.lora import save_adapters

        target = Path(args.out) / f"adapters-step{tuner.step}"
        adapters = str(target if target.exists() else save_adapters(tuner.model(), target))
    timed = tuner.step_seconds[1:]  # the first step of this process compiles
    summary = {
        "model": config.model.name, "method": config.lora.method, "base": config.lora.base,
        "rank": config.lora.rank if config.lora.method == "lora" else None,
        "trainable_parameters": tuner.trainable_parameters, "source_parameters": tuner.source_parameters,
        "trainable_fraction": tuner.trainable_parameters / tuner.source_parameters,
        "resumed_from": resumed_from, "steps": tuner.step,
        "step_seconds_median": statistics.median(timed) if timed else None,
        "step_cpu_seconds_median": statistics.median(tuner.step_cpu_seconds[1:]) if timed else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_mb": {k: v / 2**20 for k, v in tuner.memory_bytes().items()},
        "adapters": adapters, "checkpoint_dir": config.train.checkpoint_dir or None,
    }
    rows = [{"step": h["step"], "train_loss": None if h["train_loss"] is None else round(h["train_loss"], 4), "eval_loss": round(h["eval_loss"], 4),
             "eval_ppl": round(h["eval_ppl"], 3), "lr": h["lr"]} for h in tuner.history]
    if getattr(args, "json", False):
        print(json.dumps({"config": config.to_dict(), **summary, "history": rows}))
    else:
        print_table([{k: "" if v is None else v for k, v in row.items()} for row in rows])
        print_table([{key: summary[key] for key in ("method", "base", "trainable_parameters", "trainable_fraction",
                                                     "step_seconds_median", "peak_rss_mb")}])
    return summary
