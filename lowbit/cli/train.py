"""`lowbit train --config F`: run (or resume) a QAT training run from a TOML config and print
its evaluation history as a table, or one JSON object with --json."""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.cli.output import print_table, show_progress

HELP = "quantization-aware training from a TOML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="TOML file: [model], [data], [train], [quant]")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--checkpoint-dir", help="override train.checkpoint_dir ('' for none)")
    parser.add_argument("--data-parallel", type=int, help="override train.data_parallel (0 = all devices)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if the checkpoint directory holds checkpoints")
    parser.add_argument("--force", action="store_true",
                        help="resume even though settings that change the run (lr, batch size, "
                             "seq_len, seed, steps, optimizer, data) differ from the checkpoint's")


def run(args: argparse.Namespace) -> int:
    """Train as `args` say; prints the history table (or JSON) and returns 0."""
    from lowbit.train.config import load_config
    from lowbit.train.loop import Trainer

    if args.force and args.no_resume:
        raise ValueError("--force (resume with changed settings) and --no-resume exclude each other")
    config = load_config(args.config)
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
        if config.train.warmup_steps >= args.steps:  # keep the config valid for a short run
            overrides["warmup_steps"] = args.steps // 10
            print(f"note: --steps {args.steps} is not above train.warmup_steps ({config.train.warmup_steps}); "
                  f"using warmup_steps = {args.steps // 10}", file=sys.stderr)
    if args.checkpoint_dir is not None:
        overrides["checkpoint_dir"] = args.checkpoint_dir
    if args.data_parallel is not None:
        overrides["data_parallel"] = args.data_parallel
    if overrides:
        config = config.replace(train=overrides)
    resume = "force" if args.force else not args.no_resume
    trainer = Trainer(config, resume=resume, progress=show_progress(args))
    resumed_from = trainer.step
    trainer.run()
    trainer.close()
    rows = [{"step": h["step"], "train_loss": round(h["train_loss"], 4), "eval_loss": round(h["eval_loss"], 4),
             "eval_ppl": round(h["eval_ppl"], 3), "lr": h["lr"], "tokens_per_s": round(h["tokens_per_s"], 1)}
            for h in trainer.history]
    if getattr(args, "json", False):
        print(json.dumps({"config": config.to_dict(), "resumed_from": resumed_from, "history": rows,
                          "layers": trainer.quantize_report.layers}))
    else:
        print_table(rows)
    return 0
