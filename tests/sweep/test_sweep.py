"""The sweep runner: config validation before any work, grid expansion with explicit skips, a
resumed sweep writing the same CSV as an uninterrupted one, the plots and the Pareto front."""

import json
import math
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.core.spec import QuantSpec
from lowbit.sweep import (SweepConfig, expand_points, load_sweep_config, pareto_front, point_key, point_to_run,
                          read_results, run_sweep)

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


class FakeEvaluator:
    """Deterministic metrics from the point alone; raises RuntimeError at call number
    `interrupt_at` (1-based) and ValueError for int2 points."""

    def __init__(self, interrupt_at=None):
        self.calls = []
        self.interrupt_at = interrupt_at

    def __call__(self, point):
        self.calls.append(point_key(point))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise RuntimeError("interrupted")
        if point.get("bits") == 2:
            raise ValueError("int2 is not\nsupported, here")
        bits = point.get("bits") or point.get("act_bits") or 8
        clip = point.get("clip", 1.0)
        group = 0.25 if point.get("granularity") == "g64" else 0.0
        bonus = 0.3 if point.get("observer") not in (None, "none") else 0.0
        ppl = 10 * math.exp(1.7 / bits) * (1 + (1 - clip) ** 2 * 3 - clip / 7) - bonus
        return {"bits_per_weight": bits + group, "ppl": ppl, "kl": math.log(ppl) / 9,
                "top1": 1 - 1 / (bits * math.pi), "quantize_s": 0.1 * bits}


def small_config(name="demo", **changes):
    table = {"name": name,
             "data": {"eval_windows": 1},
             "grid": {"method": ["rtn"], "bits": [4, 2, 3], "granularity": ["g64", "channel"],
                      "clip": [1.0, 0.9, 0.8], "observer": ["none", "mse"]},
             "points": [{"method": "gptq", "bits": 4, "granularity": "g128", "asym": True}]}
    table.update(changes)
    return SweepConfig.from_dict(table)


def quiet(message):
    pass


def test_resumed_sweep_writes_the_same_csv_as_an_uninterrupted_one(tmp_path):
    config = small_config()
    points, _ = expand_points(config)
    whole = FakeEvaluator()
    run_sweep(config, whole, results_root=tmp_path / "whole", log=quiet)
    assert len(whole.calls) == len(points) == 3 * 2 * (3 + 1) + 1
    expected = (tmp_path / "whole" / "demo" / "results.csv").read_bytes()

    k = 9
    with pytest.raises(RuntimeError, match="interrupted"):
        run_sweep(config, FakeEvaluator(interrupt_at=k + 1), results_root=tmp_path / "cut",
                  log=quiet)
    partial = read_results(tmp_path / "cut" / "demo" / "results.csv")
    assert len(partial) == k  # a valid file holding the points finished before the interrupt
    assert [point_key(r) for r in partial] == [point_key(p) for p in points[:k]]
    errors = [r for r in partial if r["status"] != "ok"]
    assert errors and all(r["status"] == "error: int2 is not supported, here" for r in errors)

    resumed = FakeEvaluator()
    result = run_sweep(config, resumed, results_root=tmp_path / "cut", log=quiet)
    finished_before = {point_key(r) for r in partial if r["status"] == "ok"}
    assert not finished_before & set(resumed.calls)  # finished points are not run again
    assert set(resumed.calls) == {point_key(p) for p in points} - finished_before
    assert (tmp_path / "cut" / "demo" / "results.csv").read_bytes() == expected
    assert result.ran == len(resumed.calls)

    again = FakeEvaluator()
    run_sweep(config, again, results_root=tmp_path / "cut", log=quiet)
    assert all(call.startswith("method=rtn;bits=2;") for call in again.calls)  # errors only
    assert (tmp_path / "cut" / "demo" / "results.csv").read_bytes() == expected


def test_csv_columns_and_typed_round_trip(tmp_path):
    result = run_sweep(small_config(), FakeEvaluator(), results_root=tmp_path, log=quiet)
    header = (tmp_path / "demo" / "results.csv").read_text().splitlines()[0].split(",")
    assert header == ["method", "bits", "granularity", "asym", "clip", "observer",
                      "bits_per_weight", "ppl", "kl", "top1", "quantize_s", "status"]
    rows = read_results(tmp_path / "demo" / "results.csv")
    assert rows == [{c: r.get(c) for c in header} for r in result.rows]
    gptq = rows[-1]
    assert gptq["method"] == "gptq" and gptq["asym"] is True and gptq["observer"] is None
    assert gptq["ppl"] == FakeEvaluator()(gptq)["ppl"]  # floats survive the file exactly


def test_limit_runs_at_most_n_points(tmp_path):
    evaluator = FakeEvaluator()
    result = run_sweep(small_config(), evaluator, results_root=tmp_path, limit=3, log=quiet)
    assert len(evaluator.calls) == 3 == result.ran
    assert [r["status"] for r in result.rows].count("pending") == len(result.rows) - 3


def write(tmp_path, text, name="bad.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """
name = "t"
[data]
eval_windows = 1
[grid]
method = ["rtn"]
bits = [4]
granularity = ["g64"]
"""


@pytest.mark.parametrize("change, key", [
    (GOOD + "granularty = ['channel']\n", "grid.granularty"),
    (GOOD + "observer = ['median']\n", "grid.observer"),
    (GOOD + "clip = [1.5]\n", "grid.clip"),
    (GOOD + "asym = ['yes']\n", "grid.asym"),
    (GOOD + "alpha = [0.5]\n", "alpha"),  # no method of the grid takes alpha
    (GOOD.replace("bits = [4]", "bits = ['4']"), "grid.bits"),
    (GOOD.replace("bits = [4]", "bits = 4"), "grid.bits"),
    (GOOD.replace("bits = [4]\n", ""), "grid.bits"),  # required for rtn
    (GOOD.replace('method = ["rtn"]', 'method = ["rtn", "bogus"]'), "grid.method"),
    (GOOD.replace("eval_windows = 1", "eval_windows = 0"), "data.eval_windows"),
    (GOOD.replace("eval_windows = 1", "windows = 1"), "data.windows"),
    (GOOD + "[plots]\nhistogram = true\n", "plots.histogram"),
    (GOOD + "[options.awq]\nsearch_tokenz = 5\n", "options.awq.search_tokenz"),
    (GOOD + "[options.rtn]\nobserver = 'mse'\n", "options.rtn.observer"),  # an axis, not an option
    (GOOD + "[options.gptq]\ndamp = 'x'\n", "options.gptq.damp"),  # a float option given text
    (GOOD + "[options.gptq]\nblock_size = 1.5\n", "options.gptq.block_size"),
    (GOOD + "[options.gptq]\nact_order = 1\n", "options.gptq.act_order"),
    (GOOD + "[options.awq]\ngrid = 0.5\n", "options.awq.grid"),
    (GOOD + "[[points]]\nmethod = 'gptq'\nbits = 3\ngranularity = 'g64'\nobserver = 'mse'\n",
     "points[0]"),
    (GOOD + "[[points]]\nmethod = 'smoothquant'\nbits = 4\n", "points[0]"),
    (GOOD + "[[points]]\nmethod = 'llamacpp'\ngguf_type = 'Q9_9'\n", "points[0].gguf_type"),
    (GOOD + "[extra]\nx = 1\n", "extra"),
    ("name = 'a/b'\n" + GOOD.replace('name = "t"', ""), "name"),
])
def test_bad_config_fails_before_any_work_naming_the_key(tmp_path, change, key, capsys):
    path = write(tmp_path, change)
    with pytest.raises(ValueError) as error:
        load_sweep_config(path)
    assert key in str(error.value) and str(path) in str(error.value)
    assert main(["sweep", str(path), "--results", str(tmp_path / "results")]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing was run or written


def test_changed_settings_refuse_to_resume(tmp_path):
    evaluator = FakeEvaluator()
    run_sweep(small_config(), evaluator, results_root=tmp_path, limit=2, log=quiet)
    evaluator.calls.clear()
    with pytest.raises(ValueError, match="data"):
        run_sweep(small_config(data={"eval_windows": 2}), evaluator, results_root=tmp_path,
                  log=quiet)
    assert evaluator.calls == []


def test_grid_expands_per_method_and_skips_invalid_combinations():
    config = SweepConfig.from_dict({
        "name": "g",
        "grid": [{"method": ["rtn", "gptq", "smoothquant"], "bits": [4, 8],
                  "granularity": ["channel", "g64"], "clip": [1.0, 0.8],
                  "observer": ["none", "mse"]},
                 {"method": ["llamacpp"], "gguf_type": ["Q4_0", "Q8_0"]},
                 {"method": ["rtn"], "bits": [4], "granularity": ["channel"]}],
        "points": [{"method": "act", "act_bits": 6}]})
    points, skipped = expand_points(config)
    keys = [point_key(p) for p in points]
    rtn = [k for k in keys if k.startswith("method=rtn")]
    assert len(rtn) == 2 * 2 * (2 + 1)  # observer mse only at clip 1.0
    assert rtn[:3] == ["method=rtn;bits=4;granularity=channel;asym=false;clip=1.0;observer=none",
                       "method=rtn;bits=4;granularity=channel;asym=false;clip=1.0;observer=mse",
                       "method=rtn;bits=4;granularity=channel;asym=false;clip=0.8;observer=none"]
    assert len([k for k in keys if k.startswith("method=gptq")]) == 8  # observer not its axis
    assert [k for k in keys if k.startswith("method=smoothquant")] == [
        "method=smoothquant;bits=8;granularity=channel"]
    assert keys[-3:] == ["method=llamacpp;gguf_type=Q4_0", "method=llamacpp;gguf_type=Q8_0",
                         "method=act;act_bits=6;act_observer=minmax;act_granularity=tensor"]
    reasons = [reason for _, reason in skipped]
    assert sum("observer" in r for r in reasons) == 4
    assert sum("W8A8" in r for r in reasons) == 3  # smoothquant at int4 or g64
    assert sum("duplicate" in r for r in reasons) == 1  # the third grid repeats a point
    assert len(keys) == len(set(keys)) == 12 + 8 + 1 + 2 + 1


def test_point_to_run_is_the_one_mapping():
    run = point_to_run({"method": "rtn", "bits": 3, "granularity": "g64", "asym": True,
                        "clip": 0.85, "observer": "none"})
    assert run["weights"] == "int3:g64:asym:clip0.85" and run["options"] == {}
    assert QuantSpec.parse(run["weights"]).clip == 0.85
    assert point_to_run({"method": "rtn", "bits": 4, "granularity": "channel", "clip": 1.0,
                         "observer": "mse"})["options"] == {"observer": "mse"}
    awq = point_to_run({"method": "awq", "bits": 4, "granularity": "g128", "alpha": 0.5},
                       {"awq": {"search_tokens": 256}})
    assert awq["weights"] == "int4:g128" and awq["options"] == {"search_tokens": 256,
                                                                "grid": (0.5,)}
    act = point_to_run({"method": "act", "act_bits": 6, "act_observer": "kl"})
    assert act["method"] == "act" and act["options"] == {"act_bits": 6, "act_observer": "kl",
                                                        "granularity": "tensor"}
    assert point_to_run({"method": "llamacpp", "gguf_type": "Q4_0"})["weights"] == "Q4_0"
    assert point_to_run({"method": "mixed", "budget": 3.0})["options"] == {"budget": 3.0}


def test_pareto_front_on_a_hand_made_example():
    rows = [{"name": n, "bits_per_weight": x, "ppl": y} for n, x, y in [
        ("a", 2, 10), ("b", 3, 8), ("c", 3, 9), ("d", 4, 8), ("e", 4, 5), ("f", 5, 6),
        ("g", 1, 20), ("h", 6, float("nan")), ("i", 4, 5)]]
    assert [r["name"] for r in pareto_front(rows)] == ["g", "a", "b", "e"]


def _is_png(path):
    data = Path(path).read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_and_skipped_when_their_axis_is_missing(tmp_path):
    result = run_sweep(small_config(), FakeEvaluator(), results_root=tmp_path, log=quiet)
    assert sorted(p.name for p in result.plots) == ["pareto.png", "ppl_vs_clip.png"]
    assert all(_is_png(p) for p in result.plots)

    messages = []
    config = SweepConfig.from_dict({"name": "noclip", "grid": {
        "method": ["llm_int8"], "bits": [8], "granularity": ["tensor", "channel"]}})
    result = run_sweep(config, FakeEvaluator(), results_root=tmp_path, log=messages.append)
    assert [p.name for p in result.plots] == ["pareto.png"] and _is_png(result.plots[0])
    assert any("ppl_vs_clip skipped" in m for m in messages)

    config = SweepConfig.from_dict({"name": "act", "grid": {
        "method": ["act"], "act_bits": [4, 8], "act_observer": ["minmax", "mse"]}})
    result = run_sweep(config, FakeEvaluator(), results_root=tmp_path, log=quiet)
    assert "ppl_vs_act_bits.png" in [p.name for p in result.plots]
    assert all(_is_png(p) for p in result.plots)


@pytest.mark.parametrize("name, count", [("clip_sweep", 46), ("pareto", 25), ("act_clip", 36)])
def test_shipped_configs_validate(name, count):
    config = load_sweep_config(EXPERIMENTS / f"{name}.toml")
    assert config.name == name
    points, _ = expand_points(config)
    assert len(points) == count
    first_line = (EXPERIMENTS / f"{name}.toml").read_text().splitlines()[0]
    assert first_line.startswith("#")


def test_cli_dry_run_lists_points_and_runs_nothing(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("bits = [4]", "bits = [3, 4]"), "ok.toml")
    assert main(["sweep", str(path), "--dry-run", "--json", "--results", str(tmp_path / "r")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in out["rows"]] == ["pending", "pending"]
    assert not (tmp_path / "r").exists()


@pytest.mark.model
@pytest.mark.slow
def test_real_rtn_sweep_int4_beats_int3(smollm2_path, tmp_path):
    config = SweepConfig.from_dict({
        "name": "real",
        "data": {"eval_windows": 1, "ctx": 256, "calib_samples": 1, "calib_len": 16},
        "grid": {"method": ["rtn"], "bits": [3, 4], "granularity": ["g64"], "asym": [True]},
        "plots": {"ppl_vs_clip": False}})
    result = run_sweep(config, results_root=tmp_path, log=quiet)
    by_bits = {r["bits"]: r for r in read_results(tmp_path / "real" / "results.csv")}
    assert {r["status"] for r in by_bits.values()} == {"ok"}
    assert by_bits[4]["ppl"] < by_bits[3]["ppl"]
    assert by_bits[4]["kl"] < by_bits[3]["kl"]
    assert by_bits[3]["bits_per_weight"] < by_bits[4]["bits_per_weight"]
    assert [p.name for p in result.plots] == ["pareto.png"] and _is_png(result.plots[0])


def test_a_failing_evaluator_setup_stops_the_sweep(tmp_path):
    class Unprepared(FakeEvaluator):
        reference_ppl = None

        def prepare(self):
            raise ValueError("need at least windows * ctx tokens")

    evaluator = Unprepared()
    with pytest.raises(ValueError, match="windows"):
        run_sweep(small_config(), evaluator, results_root=tmp_path, log=quiet)
    assert evaluator.calls == [] and not (tmp_path / "demo" / "results.csv").exists()


def test_failed_points_make_the_command_exit_non_zero_saying_how_many(tmp_path, monkeypatch,
                                                                         capsys):
    from lowbit.sweep import runner

    monkeypatch.setattr(runner, "ModelEvaluator", lambda config, progress: FakeEvaluator())
    path = write(tmp_path, GOOD.replace("bits = [4]", "bits = [4, 2, 3]"), name="some.toml")
    assert main(["sweep", str(path), "--results", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "lowbit sweep: error: 1 of 3 points failed" in err and "results.csv" in err
    result = run_sweep(load_sweep_config(path), FakeEvaluator(), results_root=tmp_path / "r",
                       log=quiet)
    assert result.failed == 1 and result.ran == 1  # only the failed point runs again
    path = write(tmp_path, GOOD.replace('name = "t"', 'name = "fine"'), name="fine.toml")
    assert main(["sweep", str(path), "--results", str(tmp_path / "r")]) == 0


def test_labelled_points_carry_their_own_options_into_the_run_and_the_csv(tmp_path):
    config = SweepConfig.from_dict({
        "name": "labels",
        "options": {"awq": {"search_tokens": 256}},
        "points": [
            {"method": "awq", "bits": 3, "granularity": "g64", "asym": True},
            {"method": "awq", "bits": 3, "granularity": "g64", "asym": True, "label": "no clipping",
             "options": {"clip": False}},
            {"method": "smoothquant", "bits": 8, "granularity": "tensor", "label": "naive",
             "options": {"alpha": "none", "act": "int8:token"}},
            {"method": "llm_int8", "label": "vector-wise", "options": {"threshold": "none"}}]})
    points, skipped = expand_points(config)
    assert len(points) == 4 and not skipped
    runs = [point_to_run(p, config.options) for p in points]
    assert runs[0]["options"] == {"search_tokens": 256}
    assert runs[1]["options"] == {"search_tokens": 256, "clip": False} and runs[1]["label"] == "no clipping"
    assert runs[2]["options"] == {"alpha": None, "act": "int8:token"} and runs[2]["weights"] == "int8:tensor"
    assert runs[3]["options"] == {"threshold": None}
    assert len({point_key(p) for p in points}) == 4
    result = run_sweep(config, FakeEvaluator(), results_root=tmp_path, log=quiet)
    assert [r["label"] for r in read_results(result.csv_path)] == [None, "no clipping", "naive", "vector-wise"]
    assert json.loads(read_results(result.csv_path)[1]["options"]) == {"clip": False}


@pytest.mark.parametrize("point, message", [
    ({"method": "awq", "bits": 3, "granularity": "g64", "options": {"clip_tokens": "many"}}, "must be an integer"),
    ({"method": "awq", "bits": 3, "granularity": "g64", "options": {"bits": 3}}, "unknown config key"),
    ({"method": "smoothquant", "alpha": 0.5, "options": {"alpha": 0.4}}, "unknown config key"),
    ({"method": "gptq", "bits": 3, "granularity": "g64", "options": {"damp": "none"}}, "must be a number"),
    ({"method": "rtn", "bits": 3, "granularity": "g64", "label": ""}, "label must be a non-empty"),
])
def test_point_options_are_checked_against_the_method(point, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig.from_dict({"name": "bad", "points": [point]})
