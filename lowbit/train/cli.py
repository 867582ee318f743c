"""`lowbit train --config F`: run (or resume) a QAT training run from a TOML config and print
its evaluation history as a table, or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowbit.train.config import load_config


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `train` options to a (sub)parser; --json / --quiet only if not already there."""
    existing = {option for action in parser._actions for option in action.option_strings}
    parser.add_argument("--config", required=True, help="TOML file: [model], [data], [train], [quant]")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--checkpoint-dir", help="override train.checkpoint_dir ('' for none)")
    parser.add_argument("--data-parallel", type=int, help="override train.data_parallel (0 = all devices)")
    parser.add_argument("--no-resume", action="store_true",
                        help="start from scratch even if the checkpoint directory holds checkpoints")
    parser.add_argument("--force", action="store_true",
                        help="resume even though settings that change the run (lr, batch size, "
                             "seq_len, seed, steps, optimizer, data) differ from the checkpoint's")
    if "--json" not in existing:
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    if "--quiet" not in existing:
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Train as `args` say; prints the history table (or JSON) and returns 0."""
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
    quiet = getattr(args, "quiet", False)
    resume = "force" if args.force else not args.no_resume
    trainer = Trainer(config, resume=resume, progress=not quiet and sys.stderr.isatty())
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
        from lowbit.cli import print_table

        print_table(rows)
    return 0
