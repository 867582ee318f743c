"""`lowbit sweep`'s runner: every point of a config evaluated once into NAME/results.csv
(rewritten atomically after each point, so a rerun resumes), then the plots."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from lowbit.files import write_text_atomic
from lowbit.sweep.config import (AXES, METRICS, SweepConfig, expand_points, format_value, parse_value, point_key,
                                 point_to_run)
from lowbit.sweep.plots import draw_plots, log_to_stderr

def result_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The axes that have a value in some row (AXES order), then METRICS, then status."""
    axes = [a for a in AXES if a == "method" or any(r.get(a) is not None for r in rows)]
    return axes + list(METRICS) + ["status"]


def write_results(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Writes the rows as CSV atomically (lowbit.files.write_text_atomic)."""
    columns = result_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_value(row.get(c)) for c in columns])
    write_text_atomic(path, buffer.getvalue())


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results CSV with typed values (empty cells become None)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or "method" not in header or "status" not in header:
            raise ValueError(f"{path} is not a sweep results file (no method/status columns)")
        unknown = sorted(set(header) - set(AXES) - set(METRICS) - {"status"})
        if unknown:
            raise ValueError(f"{path} has unknown column(s) {unknown}")
        return [{c: parse_value(c, cell) for c, cell in zip(header, cells)} for cells in reader]


def _check_settings(directory: Path, config: SweepConfig) -> None:
    path = directory / "sweep.json"
    settings = config.settings()
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings)
                             if before.get(k) != settings.get(k))
            raise ValueError(f"{directory} holds results made with other settings (changed: "
                             f"{changed}); use another name or remove the folder")


Evaluator = Callable[[dict[str, Any]], dict[str, float]]


class ModelEvaluator:
    """The default evaluator: quantizes a fresh copy of the model per point and scores it
    against the original. The model, the reference scorer and the calibration tokens are
    loaded once (prepare(), which run_sweep calls before the first point, so that a bad
    setting such as too many evaluation windows stops the sweep) and shared by all points."""

    def __init__(self, config: SweepConfig, progress: bool = False):
        self.config = config
        self.progress = progress
        self._loaded = None

    def prepare(self):
        """Loads the model, the reference scorer and the calibration tokens (once)."""
        if self._loaded is None:
            from lowbit.models.loader import load_gguf_model
            from lowbit.models.registry import resolve_model
            from lowbit.models.tokenizer import Tokenizer
            from lowbit.data.corpus import calibration_tokens, evaluation_tokens
            from lowbit.eval.perplexity import ReferenceScorer

            data = self.config.data
            path = resolve_model(self.config.model)
            tokenizer = Tokenizer.from_gguf(path)
            original, _ = load_gguf_model(path)
            scorer = ReferenceScorer(original, evaluation_tokens(tokenizer, data["corpus"]),
                                     data["ctx"], data["eval_windows"], self.progress)
            calibration = calibration_tokens(tokenizer, data["corpus"], data["calib_samples"],
                                             data["calib_len"])
            self._loaded = (original, scorer, calibration, path)
        return self._loaded

    @property
    def reference_ppl(self) -> float | None:
        """The original model's perplexity (None before the first point)."""
        return None if self._loaded is None else self._loaded[1].ref_ppl

    def __call__(self, point: dict[str, Any]) -> dict[str, float]:
        from lowbit.sweep.runs import score_run

        original, scorer, calibration, path = self.prepare()
        row = score_run(original, point_to_run(point, self.config.options), scorer,
                        calibration, self.progress, source=path)
        return {k: row[k] for k in METRICS}


@dataclasses.dataclass
class SweepResult:
    """rows: one per point to run, in order (finished ones with metrics and status "ok" or
    "error: ..."; pending ones, left by --limit or a dry run, with status "pending");
    skipped: (point, reason) pairs; ran: points evaluated by this call; plots: files drawn."""

    name: str
    directory: Path
    csv_path: Path
    rows: list[dict[str, Any]]
    skipped: list[tuple[dict[str, Any], str]]
    ran: int = 0
    plots: list[Path] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> int:
        """Points whose last run ended in an error (they run again on the next call)."""
        return sum(1 for row in self.rows if str(row.get("status", "")).startswith("error"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "csv": str(self.csv_path), "ran": self.ran,
                "failed": self.failed,
                "rows": self.rows, "skipped": [{"point": p, "reason": r} for p, r in self.skipped],
                "plots": [str(p) for p in self.plots]}


def run_sweep(config: SweepConfig, evaluator: Evaluator | None = None, *,
              results_root: str | Path = "results", limit: int | None = None,
              dry_run: bool = False, progress: bool = False,
              log: Callable[[str], None] = log_to_stderr) -> SweepResult:
    """Runs every point of the config not yet finished in results_root/NAME/results.csv.

    The CSV is rewritten atomically after each point, rows in point order, so an interrupted
    sweep leaves a valid file and a rerun skips the finished points (status "ok"; points that
    ended in an error run again). Rows of the file that are no longer points of the config are
    kept after the others. evaluator(point) -> {bits_per_weight, ppl, kl, top1, quantize_s}
    (default: ModelEvaluator); a ValueError from it is recorded as status "error: ..." and the
    sweep goes on; other exceptions propagate. limit: at most this many points evaluated.
    dry_run: nothing evaluated, written or drawn. Plots are drawn at the end.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    points, skipped = expand_points(config)
    directory = Path(results_root) / config.name
    csv_path = directory / "results.csv"
    _check_settings(directory, config)
    previous = read_results(csv_path) if csv_path.exists() else []
    finished = {point_key(r): r for r in previous if r.get("status") == "ok"}
    keys = [point_key(p) for p in points]
    key_set = set(keys)
    leftover = [r for r in previous if point_key(r) not in key_set]  # kept, after the rest
    done: dict[str, dict] = {k: finished[k] for k in keys if k in finished}
    pending = [(k, p) for k, p in zip(keys, points) if k not in done]
    by_reason: dict[str, list[dict]] = {}
    for point, reason in skipped:
        by_reason.setdefault(reason, []).append(point)
    for reason, members in by_reason.items():
        log(f"skipped {len(members)} grid combination(s) ({reason}), e.g. "
            f"{point_key(members[0])}")
    to_run = pending if limit is None else pending[:limit]
    log(f"{config.name}: {len(points)} points, {len(done)} already done, {len(to_run)} to run"
        + (f" ({len(pending) - len(to_run)} left by --limit)" if len(to_run) < len(pending)
           else "") + (", dry run" if dry_run else ""))

    def current_rows(with_pending: bool) -> list[dict]:
        rows = []
        for key, point in zip(keys, points):
            if key in done:
                rows.append(done[key])
            elif with_pending:
                rows.append({**point, "status": "pending"})
        return rows

    result = SweepResult(config.name, directory, csv_path, current_rows(True), skipped)
    if dry_run:
        return result
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sweep.json").write_text(json.dumps(config.settings(), indent=2) + "\n",
                                          encoding="utf-8")
    evaluator = evaluator or ModelEvaluator(config, progress)
    if to_run and hasattr(evaluator, "prepare"):
        evaluator.prepare()  # outside the per-point error handling: a failure here stops
    from tqdm import tqdm

    with tqdm(to_run, desc=config.name, disable=not progress) as bar:
        for key, point in bar:
            bar.set_postfix_str(key, refresh=False)
            try:
                metrics = evaluator(dict(point))
                row = {**point, **{m: _metric(metrics, m) for m in METRICS}, "status": "ok"}
            except ValueError as error:
                message = " ".join(str(error).split())
                row = {**point, "status": f"error: {message}"}
                log(f"point {key} failed: {message}")
            done[key] = row
            result.ran += 1
            write_results(csv_path, current_rows(False) + leftover)
            # Each point compiles its own executables; holding every point's would grow the process
            # without bound (about nine memory maps each, 65530 per process at most on Linux).
            jax.clear_caches()
    if not to_run and not csv_path.exists():
        write_results(csv_path, current_rows(False) + leftover)
    result.rows = current_rows(True)
    finished_rows = [r for r in result.rows if r.get("status") == "ok"]
    result.plots = draw_plots(finished_rows, directory, config.plots,
                              _reference_ppl(directory, evaluator), log)
    return result


def _reference_ppl(directory: Path, evaluator) -> float | None:
    """The original model's perplexity from the evaluator (saved to reference.json) or, when
    this call evaluated nothing, from the file; None if neither knows it."""
    path = directory / "reference.json"
    ppl = getattr(evaluator, "reference_ppl", None)
    if ppl is not None:
        path.write_text(json.dumps({"ppl": ppl}) + "\n", encoding="utf-8")
        return ppl
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8")).get("ppl")
    return None


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)
