"""Sweeps above ptq and eval: a TOML grid of quantization points (config), each point
quantized through the PTQ method registry and scored through the one scorer (runs), into a
resumable results CSV (runner) and plots whose row schema plots.py documents."""

from lowbit.sweep.config import AXES, METRICS, SweepConfig, expand_points, load_sweep_config, point_key, point_to_run
from lowbit.sweep.plots import draw_plots, pareto_front
from lowbit.sweep.runner import ModelEvaluator, SweepResult, read_results, result_columns, run_sweep, write_results
from lowbit.sweep.runs import quantize_run, run_ptq_table, score_run

__all__ = [
    "AXES", "METRICS", "ModelEvaluator", "SweepConfig", "SweepResult", "draw_plots", "expand_points",
    "load_sweep_config", "pareto_front", "point_key", "point_to_run", "quantize_run", "read_results",
    "result_columns", "run_ptq_table", "run_sweep", "score_run", "write_results",
]
