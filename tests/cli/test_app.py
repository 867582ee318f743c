"""The `lowbit` command: JSON output, tables, and clear errors for bad input."""

import json

import pytest

from lowbit.cli import main, run_json


def test_specs_json_reports_exact_bits_and_a_sensible_snr(capsys):
    assert main(["specs", "--json", "--spec", "int4:g64", "--spec", "ternary", "--rows", "128", "--cols", "64"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    by = {(r["data"], r["spec"]): r for r in rows}
    assert by[("gaussian", "int4:g64")]["bits_per_weight"] == 4.25
    assert by[("gaussian", "int4:g64")]["snr_db"] > by[("gaussian", "ternary")]["snr_db"] > 0


def test_run_json_returns_the_commands_object_and_raises_on_failure(capsys):
    result = run_json(["specs", "--spec", "int8", "--rows", "64", "--cols", "64"])
    assert [row["spec"] for row in result["rows"]] == ["int8", "int8"]
    assert capsys.readouterr().out == ""  # the JSON was captured, not printed
    with pytest.raises(RuntimeError, match="lowbit specs --spec int9 exited with status 2"):
        run_json(["specs", "--spec", "int9"])


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


def _raising(error):
    def run(*args, **kwargs):
        raise error
    return run


@pytest.mark.parametrize("error, code, expected", [
    (KeyboardInterrupt(), 130, "lowbit generate: interrupted\n"),
    (FileExistsError(17, "File exists", "/tmp/x/out"), 2,
     "lowbit generate: error: [Errno 17] File exists: '/tmp/x/out'\n"),
    (PermissionError(13, "Permission denied", "/root/out"), 2,
     "lowbit generate: error: [Errno 13] Permission denied: '/root/out'\n"),
    (MemoryError(), 2, "lowbit generate: error: out of host memory\n"),
])
def test_library_and_system_errors_are_one_line_without_a_traceback(monkeypatch, capsys, error,
                                                                    code, expected):
    import lowbit.checkpoint

    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", _raising(error))
    assert main(["generate", "--prompt", "hi"]) == code
    captured = capsys.readouterr()
    assert captured.err == expected and captured.out == ""


def test_out_of_blocks_and_device_out_of_memory_are_errors(monkeypatch, capsys):
    import jax

    import lowbit.checkpoint
    from lowbit.kvcache.allocator import OutOfBlocksError

    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", _raising(OutOfBlocksError("need 3 free KV blocks")))
    assert main(["generate", "--prompt", "hi", "--kv", "int8"]) == 2
    assert capsys.readouterr().err == "lowbit generate: error: need 3 free KV blocks\n"
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                     "23000000000000 bytes.\nmore detail")
    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", _raising(oom))
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit generate: error: out of device memory: RESOURCE_EXHAUSTED")
    assert err.count("\n") == 1
    other = jax.errors.JaxRuntimeError("INTERNAL: a bug")
    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", _raising(other))
    with pytest.raises(jax.errors.JaxRuntimeError):  # not ours to explain: the traceback stays
        main(["generate", "--prompt", "hi"])


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0", "--kv", "int8"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature must be"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature must be"),
    (["generate", "--prompt", "hi", "--kv-policy", "window:0"], "window must be at least 1"),
    (["generate", "--prompt", "hi", "--kv", "int9"], "int9"),
    (["generate", "--prompt", "hi", "--kv", "int8", "--slots", "0"], "--slots must be"),
    (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "/nonexistent/prompt.txt"),
    (["generate"], "give a prompt"),
    (["eval", "--ctx", "1"], "--ctx must be"),
    (["eval", "--windows", "0"], "--windows must be"),
])
def test_generate_and_eval_arguments_are_checked_before_the_model_loads(monkeypatch, capsys,
                                                                       argv, fragment):
    import lowbit.checkpoint

    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", _raising(AssertionError("model loaded")))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowbit {argv[0]}: error: ") and fragment in err


def test_ctrl_c_on_a_real_process_exits_130_with_one_line():
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    program = ("import sys, lowbit.cli; print('imported', flush=True); "
               "sys.exit(lowbit.cli.main(['specs', '--rows', '8192', '--cols', '8192']))")
    process = subprocess.Popen(
        [sys.executable, "-c", program], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "imported"  # the imports take seconds when loaded
    time.sleep(3)  # inside the work (its synthetic 8192 x 8192 weights alone take longer)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "lowbit specs: interrupted" and "Traceback" not in err


def test_eval_never_reports_a_non_finite_perplexity(monkeypatch, capsys):
    import numpy as np
    from flax import nnx

    import lowbit.checkpoint
    from lowbit.models.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    model.final_norm.weight[...] = model.final_norm.weight[...] * np.nan  # e.g. a corrupt weight

    class Tokens:
        def encode(self, text):
            return [b % 128 for b in text.encode()]

    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", lambda *args: (model, Tokens()))
    assert main(["eval", "--model", "x", "--ctx", "32", "--windows", "1"]) == 2
    captured = capsys.readouterr()
    assert "is not finite ({'ppl': nan})" in captured.err and captured.out == ""
