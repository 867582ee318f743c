"""Quantized checkpoints: exact round trips, folded norms, atomic writes, bad directories."""

import json
import os

import numpy as np
import pytest

from lowbit.ptq import checkpoint
from lowbit.ptq.checkpoint import load_quantized, read_meta, read_report, save_quantized
from lowbit.ptq.layers import LLMInt8Linear, W8A8Linear
from lowbit.ptq.llm_int8 import llm_int8_quantize
from lowbit.ptq.rtn import rtn_quantize
from lowbit.ptq.smoothquant import smoothquant_quantize


@pytest.mark.parametrize("spec", ["int3:g24:asym", "nf4:g16:dq", "fp8_e4m3:channel"])
def test_rtn_round_trip_is_exact(make_tiny, test_tokens, tmp_path, spec):
    model = make_tiny()
    result = rtn_quantize(model, spec)
    expected = model(test_tokens)
    out = save_quantized(tmp_path / "ckpt", model, result)
    loaded, config, tokenizer_source = load_quantized(out)
    assert tokenizer_source is None and config == model.config
    np.testing.assert_array_equal(np.asarray(loaded(test_tokens)), np.asarray(expected))
    meta = read_meta(out)
    assert meta["method"] == "rtn" and meta["settings"]["weights"] == spec
    assert meta["linears"]["layers.1.mlp.w_down"]["weight"]["spec"] == spec
    report = read_report(out)
    assert report["bits_per_weight"] == pytest.approx(result.bits_per_weight)
    assert set(report["layers"]) == set(result.linears)
    assert all("weight_rel_error" in layer for layer in report["layers"].values())


def test_w8a8_round_trip_keeps_folded_norms_and_static_scales(make_tiny, calibration,
                                                               test_tokens, tmp_path):
    model = make_tiny()
    result = smoothquant_quantize(model, calibration, alpha=0.5, progress=False)
    expected = model(test_tokens)
    loaded, _, _ = load_quantized(save_quantized(tmp_path / "sq", model, result))
    assert isinstance(loaded.layers[0].attn.wq, W8A8Linear)
    assert loaded.layers[0].attn.wq.act_mode == "static"
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].ffn_norm.weight[...]),
                                  np.asarray(model.layers[1].ffn_norm.weight[...]))
    assert not np.allclose(np.asarray(loaded.layers[1].ffn_norm.weight[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(loaded(test_tokens)), np.asarray(expected))


def test_llm_int8_round_trip(make_tiny, test_tokens, tmp_path):
    model = make_tiny()
    result = llm_int8_quantize(model, threshold=1.0)
    expected = model(test_tokens)
    loaded, _, _ = load_quantized(save_quantized(tmp_path / "int8", model, result))
    assert isinstance(loaded.layers[1].mlp.w_gate, LLMInt8Linear)
    assert loaded.layers[1].mlp.w_gate.threshold == 1.0
    np.testing.assert_array_equal(np.asarray(loaded(test_tokens)), np.asarray(expected))


def test_existing_output_directory_is_refused(make_tiny, tmp_path):
    model = make_tiny()
    result = rtn_quantize(model, "int4:g16")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        save_quantized(tmp_path / "taken", model, result)


def test_failed_write_leaves_nothing(make_tiny, tmp_path, monkeypatch):
    model = make_tiny()
    result = rtn_quantize(model, "int4:g16")

    def broken_dumps(*args, **kwargs):
        raise KeyboardInterrupt  # an interruption after the arrays were written

    monkeypatch.setattr(checkpoint.json, "dumps", broken_dumps)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tmp_path / "ckpt", model, result)
    assert os.listdir(tmp_path) == []


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a lowbit quantized checkpoint"):
        load_quantized(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load_quantized(tmp_path)


def test_missing_source_model(make_tiny, tmp_path):
    model = make_tiny()
    result = rtn_quantize(model, "int4:g16")
    out = save_quantized(tmp_path / "ckpt", model, result,
                         source={"model": "nowhere.gguf", "path": str(tmp_path / "nowhere.gguf")})
    assert "embed" not in read_meta(out)["non_linear"]
    with pytest.raises(ValueError, match="source model"):
        load_quantized(out)
    with pytest.raises(ValueError, match="source"):
        save_quantized(tmp_path / "other", model, result, source={"model": "x"})


def test_unfinished_checkpoints_are_never_loaded(make_tiny, tmp_path):
    import shutil

    model = make_tiny()
    result = rtn_quantize(model, "int4:g16")
    out = save_quantized(tmp_path / "ckpt", model, result)
    # what a SIGKILL before the final rename leaves: a hidden partial directory, maybe complete
    partial = tmp_path / ".ckpt2.partial-99999999-abcd"
    shutil.copytree(out, partial)
    with pytest.raises(ValueError, match="unfinished write"):
        load_quantized(partial)
    with pytest.raises(ValueError, match="unfinished write"):
        read_meta(partial)
    # killed before its metadata (the last file written) was complete
    unfinished = tmp_path / "copy"
    shutil.copytree(out, unfinished)
    (unfinished / "meta.json").unlink()
    with pytest.raises(ValueError, match="not a lowbit quantized checkpoint"):
        load_quantized(unfinished)
    (unfinished / "meta.json").write_text('{"format": "lowbit-pt')
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        load_quantized(unfinished)
    shutil.copytree(out, tmp_path / "no_report")
    (tmp_path / "no_report" / "report.json").unlink()
    with pytest.raises(ValueError, match="no report.json"):
        load_quantized(tmp_path / "no_report")


def test_a_later_save_removes_a_killed_save_partial(make_tiny, tmp_path):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".ckpt.partial-{child.pid}-abcd"
    (stale / "arrays").mkdir(parents=True)
    model = make_tiny()
    save_quantized(tmp_path / "ckpt", model, rtn_quantize(model, "int4:g16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
