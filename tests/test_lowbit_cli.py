"""The `lowbit` command: JSON output, tables, and clear errors for bad input."""

import json

import pytest

from lowbit.cli import main


def test_specs_json_reports_exact_bits_and_a_sensible_snr(capsys):
    assert main(["specs", "--json", "--spec", "int4:g64", "--spec", "ternary", "--rows", "128", "--cols", "64"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    by = {(r["data"], r["spec"]): r for r in rows}
    assert by[("gaussian", "int4:g64")]["bits_per_weight"] == 4.25
    assert by[("gaussian", "int4:g64")]["snr_db"] > by[("gaussian", "ternary")]["snr_db"] > 0


def test_specs_table_has_a_header_and_one_row_per_spec(capsys):
    assert main(["specs", "--spec", "int8:channel", "--rows", "64", "--cols", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["data", "spec"] and len(lines) == 4  # header, rule, gaussian, laplace


@pytest.mark.parametrize("argv, fragment", [
    (["eval", "--model", "no-such-model"], "neither an existing GGUF file nor a known model"),
    (["specs", "--spec", "int9"], "2..8"),
    (["eval", "--model", "/nonexistent/file.gguf"], "/nonexistent/file.gguf"),
])
def test_bad_input_exits_2_with_a_message(argv, fragment, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "error" in err and fragment in err
