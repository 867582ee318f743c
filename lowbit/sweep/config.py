"""A sweep's TOML schema: the axes of a quantization point, their allowed values and CSV cell
form, SweepConfig (validated before any work), and its expansion into points, each mapped to the
run description that lowbit.sweep.runs applies (method, weight spec, options)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lowbit.files import read_toml, write_text_atomic

AXES = ("method", "bits", "granularity", "asym", "clip", "observer", "alpha", "act_bits",
        "act_observer", "act_granularity", "gguf_type", "budget", "label", "options")
# Keys only an explicit [[points]] entry takes, for any method: a label (it tells two points with
# the same axes apart) and its own options over [options.METHOD] (JSON in results.csv).
POINT_ONLY = ("label", "options")
NONE = "none"  # an option value standing for None
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

def is_number(value) -> bool:
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
        if not is_number(value) or not 0.0 < value <= 1.0:
            fail("a ratio in (0, 1]")
        value = float(value)
    elif axis == "alpha":
        if not is_number(value) or not 0.0 <= value <= 1.0:
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
        if not is_number(value) or not 1.0 <= value <= 16.0:
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
        foreign = [axis for axis in table if axis != "method" and axis not in METHOD_AXES[method]
                   and axis not in POINT_ONLY]
        if foreign:
            raise ValueError(f"{where}: axis {foreign} does not apply to method {method!r}, "
                             f"which takes {list(METHOD_AXES[method])}")
        point = {axis: check_axis_value(axis, table[axis], f"{where}.{axis}")
                 for axis in AXES if axis in table and axis not in POINT_ONLY}
        if "label" in table:
            if not isinstance(table["label"], str) or not table["label"].strip():
                raise ValueError(f"{where}.label must be a non-empty string, got {table['label']!r}")
            point["label"] = table["label"]
        if "options" in table:
            # an option set from an axis may come from here only when the point leaves that axis out
            set_by_axes = [key for key in _MAPPED_OPTIONS.get(method, ()) if key in table]
            entries = _checked_entries(method, _section(table["options"], f"{where}.options"),
                                       f"{where}.options", mapped=set_by_axes)
            point["options"] = json.dumps(entries, sort_keys=True)
        points.append(point)
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
        options[method] = _checked_entries(method, _section(entries, where), where,
                                           mapped=_MAPPED_OPTIONS.get(method, ()))
    return options


def _checked_entries(method: str, entries: dict, where: str, mapped: Sequence[str]) -> dict[str, Any]:
    """Keyword arguments of one method's function, checked against its signature; `mapped`:
    parameters set from the point's axes, which the entries may not set. The string "none"
    stands for None (TOML has no null) where the parameter may be None."""
    function = _method_function(method)
    if function is None and entries:
        raise ValueError(f"[{where}]: method {method!r} takes no options in a sweep")
    if not entries:
        return {}
    parameters = inspect.signature(function).parameters
    allowed = [p for p in parameters if p not in _RESERVED_PARAMETERS and p not in mapped]
    bad = sorted(set(entries) - set(allowed))
    if bad:
        raise ValueError(f"unknown config key(s) {[f'{where}.{k}' for k in bad]}; "
                         f"allowed keys in [{where}]: {allowed}")
    for key, value in entries.items():
        parameter = parameters[key]
        if value == NONE and (parameter.default is None or "None" in str(parameter.annotation)):
            continue
        _check_option_type(f"{where}.{key}", value, parameter.default)
    return dict(entries)


def option_values(entries: dict[str, Any]) -> dict[str, Any]:
    """Checked option entries as keyword arguments ("none" becomes None)."""
    return {key: None if value == NONE else value for key, value in entries.items()}


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
    for lowbit.sweep.runs.quantize_run; `options` are the config's [options.METHOD] tables."""
    method = point["method"]
    extra = option_values({**(options or {}).get(method, {}), **json.loads(point.get("options") or "{}")})
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
    return {"method": method, "weights": weights, "label": point.get("label") or point_key(point), "options": extra}


def _complete(point: dict[str, Any], where: str) -> dict[str, Any]:
    """The point with its method's missing axes at their defaults (ValueError if required)."""
    method = point["method"]
    full = {"method": method, **{key: point[key] for key in POINT_ONLY if key in point}}
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
