"""Experiment runner behind `lowbit sweep CONFIG.toml`: a TOML grid of quantization points
(method x bits x granularity x observer x clip ratio x ...) run on a model, one CSV row per
point (resumable), and the plots (perplexity vs clip ratio; the bits per weight Pareto front).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lowbit.files import read_toml, write_text_atomic

AXES = ("method", "bits", "granularity", "asym", "clip", "observer", "alpha", "act_bits",
        "act_observer", "act_granularity", "gguf_type", "budget")
METRICS = ("bits_per_weight", "ppl", "kl", "top1", "quantize_s")
METHODS = ("rtn", "gptq", "awq", "smoothquant", "llm_int8", "act", "llamacpp", "mixed")
WEIGHT_METHODS = ("rtn", "gptq", "awq", "smoothquant", "llm_int8")
WEIGHT_OBSERVERS = ("none", "minmax", "percentile", "mse", "kl", "aciq_laplace", "aciq_gaussian")
ACT_OBSERVERS = WEIGHT_OBSERVERS[1:]
PLOTS = ("ppl_vs_clip", "ppl_vs_act_bits", "pareto")

# The axes each method takes (rule 1); every other axis is not part of its points.
METHOD_AXES = {
    "rtn": ("bits", "granularity", "asym", "clip", "observer"),
    "gptq": ("bits", "granularity", "asym", "clip"),
    "awq": ("bits", "granularity", "asym", "clip", "alpha"),
    "smoothquant": ("bits", "granularity", "alpha"),
    "llm_int8": ("bits", "granularity"),
    "act": ("act_bits", "act_observer", "act_granularity"),  # weights untouched
    "llamacpp": ("gguf_type",),
    "mixed": ("budget",),
}
# Values a method's missing axis takes; None: the method's own default (alpha).
AXIS_DEFAULTS = {"asym": False, "clip": 1.0, "observer": "none", "alpha": None,
                 "act_observer": "minmax", "act_granularity": "tensor"}
METHOD_DEFAULTS = {"smoothquant": {"bits": 8, "granularity": "channel"},
                   "llm_int8": {"bits": 8, "granularity": "channel"}}

DATA_DEFAULTS = {"calib_samples": 4, "calib_len": 512, "eval_windows": 4, "ctx": 512,
                 "corpus": "pydoc"}
TOP_KEYS = ("name", "model", "data", "grid", "points", "options", "plots")
# Run-description keys the point mapping sets, so [options.METHOD] may not.
_MAPPED_OPTIONS = {"rtn": ("observer",), "awq": (), "smoothquant": ("alpha",),
                   "act": ("act_bits", "act_observer", "observer", "granularity"),
                   "mixed": ("budget",)}
_RESERVED_PARAMETERS = ("model", "calibration", "spec", "weights", "progress")


# ---- values ----------------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_axis_value(axis: str, value, where: str):
    """The value of one axis, normalized (ints for clip become floats); ValueError naming
    `where` (e.g. "grid.clip") and the allowed values otherwise."""
    def fail(allowed: str):
        raise ValueError(f"{where} must be {allowed}, got {value!r}")

    if axis == "method":
        if value not in METHODS:
            fail(f"one of {list(METHODS)}")
    elif axis in ("bits", "act_bits"):
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
            fail("an integer in 2..8")
    elif axis == "granularity":
        if not isinstance(value, str) or not (value in ("tensor", "channel")
                                              or re.fullmatch(r"g[1-9][0-9]*", value)):
            fail('"tensor", "channel" or "gN" (groups of N inputs, e.g. "g64")')
    elif axis == "asym":
        if not isinstance(value, bool):
            fail("true or false")
    elif axis == "clip":
        if not _is_number(value) or not 0.0 < value <= 1.0:
            fail("a ratio in (0, 1]")
        value = float(value)
    elif axis == "alpha":
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            fail("a number in [0, 1]")
        value = float(value)
    elif axis == "observer":
        if value not in WEIGHT_OBSERVERS:
            fail(f"one of {list(WEIGHT_OBSERVERS)}")
    elif axis == "act_observer":
        if value not in ACT_OBSERVERS:
            fail(f"one of {list(ACT_OBSERVERS)}")
    elif axis == "act_granularity":
        if value not in ("tensor", "channel"):
            fail('"tensor" or "channel" (one static threshold per input or per input feature)')
    elif axis == "gguf_type":
        types = _gguf_types()
        if value not in types:
            fail(f"one of {list(types)}")
    elif axis == "budget":
        if not _is_number(value) or not 1.0 <= value <= 16.0:
            fail("bits per weight in [1, 16]")
        value = float(value)
    else:
        raise ValueError(f"{where}: unknown axis {axis!r}; allowed: {list(AXES)}")
    return value


def _gguf_types() -> tuple[str, ...]:
    from lowbit.ptq.llamacpp import LLAMACPP_TYPES

    return LLAMACPP_TYPES


def format_value(value) -> str:
    """A CSV cell: "" for None, true/false for booleans, repr for floats (exact round trip)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


_AXIS_TYPES = {"bits": int, "act_bits": int, "asym": bool, "clip": float, "alpha": float,
               "budget": float}


def parse_value(column: str, text: str):
    """The inverse of format_value for a results column."""
    if text == "":
        return None
    kind = _AXIS_TYPES.get(column, float if column in METRICS else str)
    if kind is bool:
        if text not in ("true", "false"):
            raise ValueError(f"column {column!r} must be true or false, got {text!r}")
        return text == "true"
    return kind(text)


def point_key(point: dict[str, Any]) -> str:
    """A stable key of a point's axes (those with a value), in AXES order."""
    return ";".join(f"{axis}={format_value(point[axis])}" for axis in AXES
                    if point.get(axis) is not None)


# ---- the config ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: name, model, data sizes, grids (axis -> tuple of values), explicit
    points, per-method options and the plots to draw. Build with from_dict or
    load_sweep_config, which check everything before any work. The TOML form, every key
    optional but at least one grid or point:

        name = "clip_sweep"                 # results go to results/<name>/ (default: the file stem)
        model = "smollm2-135m"              # a registered name or a GGUF path
        [data]                              # calib_samples, calib_len, eval_windows, ctx, corpus
        eval_windows = 4
        [grid]                              # or [[grid]] for several grids; each axis is a list
        method = ["rtn"]
        bits = [3, 4]
        granularity = ["g64", "channel"]
        clip = [1.0, 0.9, 0.8]
        observer = ["none", "mse"]
        [[points]]                          # explicit extra points, one value per axis
        method = "gptq"
        bits = 3
        granularity = "channel"
        [options.awq]                       # keyword arguments passed to one method's function
        search_tokens = 256
        [plots]                             # which plots to draw (default: all three)
        ppl_vs_clip = true                  # perplexity vs clip ratio
        ppl_vs_act_bits = false             # perplexity vs activation bits, per act_observer
        pareto = true                       # bits per weight vs perplexity, with the front
    """

    name: str
    model: str = "smollm2-135m"
    data: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DATA_DEFAULTS))
    grids: tuple = ()
    points: tuple = ()
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    plots: tuple = PLOTS
    source: str | None = None

    @classmethod
    def from_dict(cls, table: dict[str, Any], default_name: str | None = None,
                  source: str | None = None) -> "SweepConfig":
        """From parsed TOML; any unknown section, key or value raises ValueError naming it."""
        if not isinstance(table, dict):
            raise ValueError(f"a sweep config must be a table, got {type(table).__name__}")
        unknown = sorted(set(table) - set(TOP_KEYS))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; allowed: {list(TOP_KEYS)}")
        name = table.get("name", default_name)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"name must be a folder name of letters, digits, '_', '.' or '-', "
                             f"got {name!r}")
        model = table.get("model", "smollm2-135m")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a model name or GGUF path, got {model!r}")
        config = cls(name=name, model=model, data=_check_data(table.get("data", {})),
                     grids=_check_grids(table.get("grid")),
                     points=_check_points(table.get("points", [])),
                     options=_check_options(table.get("options", {})),
                     plots=_check_plots(table.get("plots")), source=source)
        if not config.grids and not config.points:
            raise ValueError("the config has no [grid] and no [[points]]: nothing to run")
        expand_points(config)  # combination errors in explicit points surface here
        return config

    def settings(self) -> dict[str, Any]:
        """What every row depends on besides its point (checked when a sweep resumes)."""
        return json.loads(json.dumps({"model": self.model, "data": self.data,
                                      "options": self.options}))


def _section(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"[{name}] must be a table, got {value!r}")
    return value


def _axes_table(value, where: str) -> dict:
    """A [[grid]] or [[points]] table: only axis keys, and a method."""
    table = _section(value, where)
    unknown = sorted(set(table) - set(AXES))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}.{k}' for k in unknown]}; "
                         f"allowed axes: {list(AXES)}")
    if "method" not in table:
        raise ValueError(f"{where}.method is required (methods: {list(METHODS)})")
    return table


def _check_data(table) -> dict[str, Any]:
    table = _section(table, "data")
    unknown = sorted(set(table) - set(DATA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'data.{k}' for k in unknown]}; allowed keys "
                         f"in [data]: {list(DATA_DEFAULTS)}")
    data = {**DATA_DEFAULTS, **table}
    for key, minimum in (("calib_samples", 1), ("calib_len", 2), ("eval_windows", 1), ("ctx", 2)):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(data["corpus"], str) or not data["corpus"]:
        raise ValueError(f"data.corpus must be 'pydoc' or a text file, got {data['corpus']!r}")
    return data


def _check_grids(value) -> tuple:
    if value is None:
        return ()
    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"grid must be a [grid] table or [[grid]] tables, got {value!r}")
    grids = []
    for index, table in enumerate(tables):
        where = "grid" if isinstance(value, dict) else f"grid[{index}]"
        table = _axes_table(table, where)
        grid = {}
        for axis in AXES:
            if axis not in table:
                continue
            values = table[axis]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}.{axis} must be a non-empty list, got {values!r}")
            checked = [check_axis_value(axis, v, f"{where}.{axis}") for v in values]
            if len({format_value(v) for v in checked}) != len(checked):
                raise ValueError(f"{where}.{axis} repeats a value: {values!r}")
            grid[axis] = tuple(checked)
        used = {axis for method in grid["method"] for axis in METHOD_AXES[method]}
        unused = [axis for axis in grid if axis != "method" and axis not in used]
        if unused:
            raise ValueError(f"{where}: axis {unused} is taken by none of its methods "
                             f"{list(grid['method'])} (see METHOD_AXES)")
        grids.append(grid)
    return tuple(grids)


def _check_points(value) -> tuple:
    if not isinstance(value, list):
        raise ValueError(f"points must be [[points]] tables, got {value!r}")
    points = []
    for index, table in enumerate(value):
        where = f"points[{index}]"
        table = _axes_table(table, where)
        method = check_axis_value("method", table["method"], f"{where}.method")
        foreign = [axis for axis in table if axis != "method" and axis not in METHOD_AXES[method]]
        if foreign:
            raise ValueError(f"{where}: axis {foreign} does not apply to method {method!r}, "
                             f"which takes {list(METHOD_AXES[method])}")
        points.append({axis: check_axis_value(axis, table[axis], f"{where}.{axis}")
                       for axis in AXES if axis in table})
    return tuple(points)


def _method_function(method: str):
    """The library function behind a registered method (its keyword arguments are the keys
    [options.METHOD] takes), or None for llamacpp, which takes no options in a sweep."""
    from lowbit.ptq.methods import get_method

    return None if method == "llamacpp" else get_method(method).function


def _check_options(value) -> dict[str, dict[str, Any]]:
    table = _section(value, "options")
    options = {}
    for method, entries in table.items():
        where = f"options.{method}"
        if method not in METHODS:
            raise ValueError(f"unknown config key {where!r}; [options.METHOD] takes a method of "
                             f"{list(METHODS)}")
        entries = _section(entries, where)
        function = _method_function(method)
        if function is None and entries:
            raise ValueError(f"[{where}]: method {method!r} takes no options in a sweep")
        if entries:
            parameters = inspect.signature(function).parameters
            allowed = [p for p in parameters if p not in _RESERVED_PARAMETERS
                       and p not in _MAPPED_OPTIONS.get(method, ())]
            bad = sorted(set(entries) - set(allowed))
            if bad:
                raise ValueError(f"unknown config key(s) {[f'{where}.{k}' for k in bad]}; "
                                 f"allowed keys in [{where}]: {allowed}")
            for key, value in entries.items():
                _check_option_type(f"{where}.{key}", value, parameters[key].default)
        options[method] = dict(entries)
    return options


def _check_option_type(where: str, value, default) -> None:
    """An option must have the type of its parameter's default (a float option takes an int
    too, a sequence a TOML array); options without a default or with None are not checked."""
    if default is inspect.Parameter.empty or default is None:
        return
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, wanted = isinstance(value, str), "a string"
    elif isinstance(default, (tuple, list)):
        ok, wanted = isinstance(value, list), "an array"
    else:
        return
    if not ok:
        raise ValueError(f"{where} must be {wanted} (default {default!r}), got {value!r}")


def _check_plots(value) -> tuple:
    if value is None:
        return PLOTS
    table = _section(value, "plots")
    unknown = sorted(set(table) - set(PLOTS))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'plots.{k}' for k in unknown]}; allowed "
                         f"keys in [plots]: {list(PLOTS)}")
    for key, flag in table.items():
        if not isinstance(flag, bool):
            raise ValueError(f"plots.{key} must be true or false, got {flag!r}")
    return tuple(p for p in PLOTS if table.get(p, True))


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep config; errors name the file and the key."""
    path = Path(path)
    table = read_toml(path, "sweep config")
    try:
        return SweepConfig.from_dict(table, default_name=path.stem, source=str(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


# ---- points ----------------------------------------------------------------------------------

def weight_spec(point: dict[str, Any]) -> str:
    """The weight spec string of a weight-method point: int{bits}:{granularity}[:asym][:clipR]."""
    spec = f"int{point['bits']}:{point['granularity']}"
    if point.get("asym"):
        spec += ":asym"
    clip = point.get("clip")
    if clip is not None and clip != 1.0:
        spec += f":clip{clip!r}"
    return spec


def point_to_run(point: dict[str, Any], options: dict[str, dict] | None = None) -> dict:
    """THE mapping from a point to a run description {"method", "weights", "label", "options"}
    for lowbit.ptq.demo.quantize_run; `options` are the config's [options.METHOD] tables."""
    method = point["method"]
    extra = dict((options or {}).get(method, {}))
    weights = ""
    if method in WEIGHT_METHODS:
        weights = weight_spec(point)
    if method == "rtn" and point.get("observer", "none") != "none":
        extra["observer"] = point["observer"]
    if method == "awq" and point.get("alpha") is not None:
        extra["grid"] = (point["alpha"],)  # a fixed alpha instead of AWQ's search
    if method == "smoothquant" and point.get("alpha") is not None:
        extra["alpha"] = point["alpha"]
    if method == "act":
        extra.update(act_bits=point["act_bits"], act_observer=point["act_observer"],
                     granularity=point.get("act_granularity", "tensor"))
    if method == "llamacpp":
        weights = point["gguf_type"]
    if method == "mixed":
        extra["budget"] = point["budget"]
    return {"method": method, "weights": weights, "label": point_key(point), "options": extra}


def _complete(point: dict[str, Any], where: str) -> dict[str, Any]:
    """The point with its method's missing axes at their defaults (ValueError if required)."""
    method = point["method"]
    full = {"method": method}
    for axis in METHOD_AXES[method]:
        if axis in point:
            full[axis] = point[axis]
        elif axis in METHOD_DEFAULTS.get(method, {}):
            full[axis] = METHOD_DEFAULTS[method][axis]
        elif axis in AXIS_DEFAULTS:
            full[axis] = AXIS_DEFAULTS[axis]
        else:
            raise ValueError(f"{where}.{axis} is required for method {method!r}")
    return full


def combination_problem(point: dict[str, Any]) -> str | None:
    """Why a complete point cannot run (rules 2 and 3 of the module docstring), or None."""
    method = point["method"]
    if point.get("observer", "none") != "none" and point.get("clip", 1.0) != 1.0:
        return ("an observer picks its own clipping range; clip ratios other than 1.0 go "
                "with observer 'none'")
    if method in WEIGHT_METHODS:
        from lowbit.ptq.methods import get_method

        check = get_method(method).check_weights
        try:
            check(weight_spec(point))
        except ValueError as error:
            return f"{method}: {error}"
    return None


def expand_points(config: SweepConfig) -> tuple[list[dict], list[tuple[dict, str]]]:
    """(points to run in order, skipped (point, reason) pairs): each grid method-major with
    the last axis varying fastest, then the explicit points. ValueError for an explicit point
    that cannot run or a required axis missing from a grid.

    Rules, in this order:
    1. Each method takes only its own axes (METHOD_AXES); the other axes of the grid do not
       multiply its points. An axis that no method of its grid takes is an error. A method's
       axis missing from the grid takes its default (METHOD_DEFAULTS, then AXIS_DEFAULTS);
       bits and granularity of rtn/gptq/awq, act_bits, gguf_type and budget must be given.
    2. A weight observer other than "none" picks its own clipping range, so it is only
       combined with clip 1.0; other clip ratios are skipped (only rtn takes observers).
    3. A weight spec the method rejects (e.g. smoothquant/llm_int8 need symmetric int8 per
       tensor or channel) is skipped with the method's own message.
    4. A point equal to an earlier one (same key) is skipped as a duplicate.
    Skipped grid combinations are reported with their reason (SweepResult.skipped, logged by
    run_sweep, listed by `--dry-run`); an explicit [[points]] entry that breaks a rule is a
    config error instead.
    """
    points: list[dict] = []
    skipped: list[tuple[dict, str]] = []
    seen: set[str] = set()

    def add(point, where, explicit):
        problem = combination_problem(point)
        key = point_key(point)
        if problem is None and key in seen:
            problem = "duplicate of an earlier point"
        if problem is None:
            seen.add(key)
            points.append(point)
        elif explicit:
            raise ValueError(f"{where} ({key}): {problem}")
        else:
            skipped.append((point, problem))

    for index, grid in enumerate(config.grids):
        where = "grid" if len(config.grids) == 1 else f"grid[{index}]"
        for method in grid["method"]:
            axes = [axis for axis in METHOD_AXES[method] if axis in grid]
            for values in itertools.product(*(grid[axis] for axis in axes)):
                add(_complete({"method": method, **dict(zip(axes, values))}, where), where,
                    explicit=False)
    for index, point in enumerate(config.points):
        where = f"points[{index}]"
        add(_complete(point, where), where, explicit=True)
    return points, skipped


# ---- results file ----------------------------------------------------------------------------

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


# ---- running ---------------------------------------------------------------------------------

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
        from lowbit.ptq.demo import score_run

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


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_sweep(config: SweepConfig, evaluator: Evaluator | None = None, *,
              results_root: str | Path = "results", limit: int | None = None,
              dry_run: bool = False, progress: bool = False,
              log: Callable[[str], None] = _log_to_stderr) -> SweepResult:
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


# ---- plots -----------------------------------------------------------------------------------

def pareto_front(rows: Sequence[dict[str, Any]], x: str = "bits_per_weight",
                 y: str = "ppl") -> list[dict[str, Any]]:
    """The rows no other row beats on both x and y (lower is better for both; a row equal to
    an earlier one on both is dropped), sorted by x. Rows without finite x and y are ignored."""
    usable = [r for r in rows if _finite(r.get(x)) and _finite(r.get(y))]
    front, best = [], math.inf
    for row in sorted(usable, key=lambda r: (r[x], r[y])):
        if row[y] < best:
            front.append(row)
            best = row[y]
    return front


def _finite(value) -> bool:
    return _is_number(value) and math.isfinite(value)


def _label(row: dict[str, Any], axes: Sequence[str]) -> str:
    parts = []
    for axis in axes:
        value = row.get(axis)
        if value is None:
            continue
        if axis == "bits":
            parts.append(f"int{value}")
        elif axis == "asym":
            parts.append("asym" if value else "sym")
        elif axis in ("method", "granularity", "gguf_type"):
            parts.append(str(value))
        else:
            parts.append(f"{axis} {format_value(value)}")
    return " ".join(parts)


def plot_ppl_vs_clip(rows: Sequence[dict[str, Any]], path: Path,
                     reference_ppl: float | None = None) -> str | None:
    """Perplexity vs clip ratio, one line per setting of the other axes (bit width,
    granularity, ...; one color each) and observer; an observer that only ran at one clip ratio
    (it picks its own range) is a horizontal line in its setting's color, one dash style per
    observer. Returns why it was skipped, or None when drawn."""
    usable = [r for r in rows if r.get("clip") is not None and _finite(r.get("ppl"))]
    clips = sorted({r["clip"] for r in usable})
    if len(clips) < 2:
        return "needs rows with a clip axis of at least two ratios"
    varying = [a for a in AXES if a != "clip"
               and len({format_value(r.get(a)) for r in usable}) > 1]
    family_axes = [a for a in varying if a != "observer"]
    families = list(dict.fromkeys(_label(r, family_axes) or "all" for r in usable))
    observers = list(dict.fromkeys(format_value(r.get("observer")) for r in usable))
    dashes = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3))]
    groups: dict[tuple, list[dict]] = {}
    for row in usable:
        family = _label(row, family_axes) or "all"
        groups.setdefault((family, format_value(row.get("observer"))), []).append(row)
    figure, axes = _figure()
    for (family, observer), members in groups.items():
        members.sort(key=lambda r: r["clip"])
        color = f"C{families.index(family) % 10}"
        label = family + (f" observer {observer}" if "observer" in varying else "")
        if len(members) == 1:
            style = dashes[observers.index(observer) % len(dashes)]
            axes.axhline(members[0]["ppl"], color=color, linestyle=style, linewidth=1.2,
                         label=f"{label} (clip {format_value(members[0]['clip'])})")
        else:
            axes.plot([r["clip"] for r in members], [r["ppl"] for r in members], marker="o",
                      color=color, label=label)
    if reference_ppl:
        axes.axhline(reference_ppl, color="black", linestyle=":", label="original")
    axes.set_xlabel("clip ratio (fraction of the min-max range)")
    axes.invert_xaxis()
    _finish(axes)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return None


def plot_ppl_vs_act_bits(rows: Sequence[dict[str, Any]], path: Path,
                         reference_ppl: float | None = None) -> str | None:
    """Perplexity vs activation bit width, one line per setting of the other axes (the
    activation observer, ...). Returns why it was skipped, or None when drawn."""
    usable = [r for r in rows if r.get("act_bits") is not None and _finite(r.get("ppl"))]
    if len({r["act_bits"] for r in usable}) < 2:
        return "needs rows with an act_bits axis of at least two bit widths"
    varying = [a for a in AXES if a != "act_bits"
               and len({format_value(r.get(a)) for r in usable}) > 1]
    groups: dict[str, list[dict]] = {}
    for row in usable:
        groups.setdefault(_label(row, varying) or "all", []).append(row)
    figure, axes = _figure()
    for index, (label, members) in enumerate(groups.items()):
        members.sort(key=lambda r: r["act_bits"])
        axes.plot([r["act_bits"] for r in members], [r["ppl"] for r in members], marker="o",
                  color=f"C{index % 10}", linestyle=["-", "--"][index // 10 % 2], label=label)
    if reference_ppl:
        axes.axhline(reference_ppl, color="black", linestyle=":", label="original")
    axes.set_xlabel("activation bits")
    axes.set_xticks(sorted({r["act_bits"] for r in usable}))
    _finish(axes)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return None


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path,
                reference_ppl: float | None = None) -> str | None:
    """Bits per weight vs perplexity (log y), one color per method, the Pareto front as a
    line. Returns why it was skipped, or None when drawn."""
    usable = [r for r in rows if _finite(r.get("bits_per_weight")) and _finite(r.get("ppl"))]
    if not usable:
        return "needs rows with a finite bits_per_weight and ppl"
    figure, axes = _figure()
    methods = list(dict.fromkeys(r["method"] for r in usable))
    for index, method in enumerate(methods):
        members = [r for r in usable if r["method"] == method]
        axes.scatter([r["bits_per_weight"] for r in members], [r["ppl"] for r in members],
                     color=f"C{index % 10}", label=method, zorder=3)
    front = pareto_front(usable)
    axes.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], color="black",
              linewidth=1, drawstyle="steps-post", label="Pareto front", zorder=2)
    if reference_ppl:
        axes.axhline(reference_ppl, color="gray", linestyle=":", label="original")
    axes.set_xlabel("bits per weight (block linears)")
    _finish(axes)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return None


def _finish(axes) -> None:
    """Perplexity on a log axis with plain numbers, a grid, the legend outside on the right."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axes.set_ylabel("perplexity")
    axes.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(plain)
    low, high = axes.get_ylim()
    # minor ticks labelled only when the axis spans less than a decade
    axes.yaxis.set_minor_formatter(plain if high < 10 * low else NullFormatter())
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)  # the Agg backend, without pyplot's global state
    return figure, figure.add_subplot()


PLOT_FUNCTIONS = {"ppl_vs_clip": plot_ppl_vs_clip, "ppl_vs_act_bits": plot_ppl_vs_act_bits,
                  "pareto": plot_pareto}


def draw_plots(rows: Sequence[dict[str, Any]], directory: str | Path,
               which: Sequence[str] = PLOTS, reference_ppl: float | None = None,
               log: Callable[[str], None] = _log_to_stderr) -> list[Path]:
    """Draws the named plots of the finished rows into directory/NAME.png; a plot whose data
    are missing is skipped with a message. Returns the files written."""
    written = []
    for name in which:
        if name not in PLOT_FUNCTIONS:
            raise ValueError(f"unknown plot {name!r}; allowed: {list(PLOT_FUNCTIONS)}")
        path = Path(directory) / f"{name}.png"
        reason = PLOT_FUNCTIONS[name](rows, path, reference_ppl)
        if reason:
            log(f"plot {name} skipped: {reason}")
        else:
            written.append(path)
    return written
