"""`lowbit sweep CONFIG.toml`: a grid of quantization points into results/NAME/results.csv
(resumable) and its plots."""

from __future__ import annotations

import sys

from lowbit.cli.output import emit, show_progress

HELP = "run a grid of quantization points from a TOML config into results/NAME/results.csv (resumable) and draw its plots"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a sweep config, e.g. experiments/clip_sweep.toml")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and list the points (done / pending / skipped); run nothing")
    parser.add_argument("--limit", type=int, default=None, help="run at most N pending points")
    parser.add_argument("--results", default="results", help="results root (default: results)")


def run(args) -> int:
    from lowbit.sweep import load_sweep_config, result_columns, run_sweep

    config = load_sweep_config(args.config)
    result = run_sweep(config, results_root=args.results, limit=args.limit, dry_run=args.dry_run,
                       progress=show_progress(args))
    rows = [{k: v for k, v in row.items() if v is not None} for row in result.rows]
    emit(args, result.to_json(), rows, result_columns(result.rows))
    if result.failed:
        print(f"lowbit sweep: error: {result.failed} of {len(result.rows)} points failed (status "
              f"'error: ...' in {result.csv_path}; a rerun retries them)", file=sys.stderr)
        return 1
    return 0
