"""The `lowbit` command line: one module per command (HELP, add_arguments, run) behind
lowbit.cli.app; no library module imports this package."""

from lowbit.cli.app import build_parser, main, run_json

__all__ = ["build_parser", "main", "run_json"]
