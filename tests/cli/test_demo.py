"""`lowbit demo`: its runs, its Markdown table, and the comparison with README.md's demo table."""

from pathlib import Path

from lowbit.cli.demo import COLUMNS, README_BEGIN, README_END, demo_runs, differences, readme_table
from lowbit.cli.output import markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_demo_runs_every_method_at_every_spec():
    runs = demo_runs()
    assert [(r["method"], r["weights"]) for r in runs[:3]] == [
        ("rtn", "int4:g64:asym"), ("gptq", "int4:g64:asym"), ("awq", "int4:g64:asym")]
    assert len(runs) == 6


def test_markdown_table_cells():
    table = markdown_table([{"method": "rtn", "weights": "int4", "ppl": 12.3456, "kl": 1234.5}],
                           ["method", "weights", "ppl", "kl"])
    assert table.splitlines()[2] == "| rtn | int4 | 12.3456 | 1234.5 |"


def test_differences_name_each_changed_cell():
    rows = [{"method": "original", "weights": "gguf Q4_1", "bits_per_weight": 5.0, "ppl": 9.8331, "kl": 0.0,
             "top1": 1.0, "quantize_s": 0.0},
            {"method": "gptq", "weights": "int4:g64:asym", "bits_per_weight": 4.5, "ppl": 11.4321, "kl": 0.18,
             "top1": 0.807, "quantize_s": 44.0}]
    recorded = readme_table(f"x\n{README_BEGIN}\n{markdown_table(rows, COLUMNS)}\n{README_END}\ny")
    assert differences(rows, recorded) == []
    slower = [dict(rows[0]), dict(rows[1], quantize_s=90.0)]  # a time is not a result
    assert differences(slower, recorded) == []
    changed = [dict(rows[0]), dict(rows[1], ppl=11.8301)]
    assert differences(changed, recorded) == ["gptq int4:g64:asym ppl: 11.4321 recorded, 11.8301 now"]
    assert differences(rows[:1], recorded) == ["the rows (method, weights) differ"]


def test_readme_holds_the_demo_table_as_lowbit_demo_prints_it():
    recorded = readme_table(README.read_text(encoding="utf-8"))
    assert recorded is not None, "README.md lacks the demo table markers"
    expected = [("original", "gguf Q4_1")] + [(r["method"], r["weights"]) for r in demo_runs()]
    assert [(r["method"], r["weights"]) for r in recorded] == expected
    assert all(set(row) == set(COLUMNS) for row in recorded)
