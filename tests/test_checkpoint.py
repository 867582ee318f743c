"""lowbit.save / lowbit.load: exact round trips of packed models, bytes on disk equal to the
bits-per-weight accounting, int8 runtime layers, the dequant runtime, atomic writes, clear errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit import checkpoint
from lowbit.checkpoint import layer_bytes, load, quantized_layers, read_info, read_meta, save
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn.packed_layer import PackedLayer
from lowbit.ptq.layers import LLMInt8Linear, W8A8Linear
from lowbit.ptq.llm_int8 import llm_int8_quantize
from lowbit.ptq.rtn import rtn_quantize
from lowbit.ptq.smoothquant import smoothquant_quantize


def _tiny():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(7))


def _tokens(seed=4):
    return np.random.default_rng(seed).integers(0, 128, (2, 32)).astype(np.int32)


@pytest.mark.parametrize("spec", ["int4:g16", "int3:g24:asym", "nf4:g16:dq", "fp8_e4m3:channel",
                                  "ternary:g32"])
def test_packed_round_trip_is_exact_and_bytes_match_the_accounting(tmp_path, spec):
    model = _tiny()
    result = rtn_quantize(model, spec)
    expected = model(_tokens())
    out = save(model, tmp_path / "ckpt", info={"method": result.method})
    loaded = load(out)  # a built-in model: no user code
    assert read_info(out) == {"method": "rtn"}
    layers = quantized_layers(loaded)
    assert set(layers) == set(result.linears)
    assert all(isinstance(layer, PackedLayer) for layer in layers.values())
    np.testing.assert_array_equal(np.asarray(loaded(_tokens())), np.asarray(expected))
    meta = read_meta(out)
    on_disk = layer_bytes(out)
    weights = 0
    for path, layer in layers.items():  # Llama linears have no bias: all bytes are the weight
        assert "bias" not in meta["layers"][path]["arrays"]
        assert on_disk[path] == layer.nbytes
        weights += layer.in_features * layer.out_features
    assert 8 * sum(on_disk.values()) / weights == pytest.approx(result.bits_per_weight, abs=1e-12)
    float_bytes = sum(e["nbytes"] for k, e in meta["arrays"].items() if k.startswith("params/"))
    file_bytes = os.path.getsize(out / checkpoint.ARRAYS_FILE)
    assert file_bytes == float_bytes + sum(on_disk.values())  # nothing else: no float copies


def test_dequant_runtime_gives_float_layers_with_the_same_weights(tmp_path):
    model = _tiny()
    rtn_quantize(model, "int4:g16:asym")
    out = save(model, tmp_path / "ckpt")
    dequantized = load(out, runtime="dequant")
    assert not quantized_layers(dequantized)
    wq = dequantized.layers[1].attn.wq
    assert isinstance(wq, nnx.Linear)
    np.testing.assert_array_equal(np.asarray(wq.kernel[...]),
                                  np.asarray(model.layers[1].attn.wq.dequantized_kernel()))
    np.testing.assert_allclose(np.asarray(dequantized(_tokens())), np.asarray(model(_tokens())),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="runtime must be one of"):
        load(out, runtime="float")


def test_w8a8_round_trip_keeps_folded_norms_and_static_scales(tmp_path):
    model = _tiny()
    calibration = np.random.default_rng(3).integers(0, 128, (4, 32)).astype(np.int32)
    smoothquant_quantize(model, calibration, alpha=0.5, progress=False)
    expected = model(_tokens())
    loaded = load(save(model, tmp_path / "sq"))
    assert isinstance(loaded.layers[0].attn.wq, W8A8Linear)
    assert loaded.layers[0].attn.wq.act_mode == "static"
    np.testing.assert_array_equal(np.asarray(loaded.layers[1].ffn_norm.weight[...]),
                                  np.asarray(model.layers[1].ffn_norm.weight[...]))
    assert not np.allclose(np.asarray(loaded.layers[1].ffn_norm.weight[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(loaded(_tokens())), np.asarray(expected))


def test_llm_int8_round_trip(tmp_path):
    model = _tiny()
    llm_int8_quantize(model, threshold=1.0)
    expected = model(_tokens())
    out = save(model, tmp_path / "int8")
    loaded = load(out)
    assert isinstance(loaded.layers[1].mlp.w_gate, LLMInt8Linear)
    assert loaded.layers[1].mlp.w_gate.threshold == 1.0
    layer = model.layers[1].mlp.w_gate
    assert layer_bytes(out)["layers.1.mlp.w_gate"] == layer.nbytes
    np.testing.assert_array_equal(np.asarray(loaded(_tokens())), np.asarray(expected))


class _Foreign(nnx.Module):
    def __init__(self, *, rngs):
        self.a = nnx.Linear(32, 16, rngs=rngs)
        self.b = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


def test_foreign_model_needs_its_structure(tmp_path):
    from lowbit.nn import QuantRule
    from lowbit.ptq.methods import quantize

    model = _Foreign(rngs=nnx.Rngs(0))
    quantize(model, [QuantRule(path="a", weight_spec="int4:g16"),
                     QuantRule(path="b", keep_float=True)])
    x = jnp.ones((3, 32))
    out = save(model, tmp_path / "foreign")
    with pytest.raises(ValueError, match=r"lowbit.load\(dir, model=MyModel"):
        load(out)
    loaded = load(out, model=nnx.eval_shape(lambda: _Foreign(rngs=nnx.Rngs(0))))
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    with pytest.raises(ValueError, match="the model has no layer at 'a'"):
        load(out, model=Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)))
    other = _Foreign(rngs=nnx.Rngs(0))
    other.b = nnx.Linear(16, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"parameter 'b.bias' has shape \(4,\) in the checkpoint"):
        load(out, model=other)


def test_existing_directory_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        save(_tiny(), tmp_path / "taken")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = _tiny()
    rtn_quantize(model, "int4:g16")

    def broken_rename(*args, **kwargs):
        raise KeyboardInterrupt  # an interruption after every file was written

    monkeypatch.setattr(checkpoint.os, "rename", broken_rename)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        load(tmp_path)
    (tmp_path / checkpoint.META_FILE).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        load(tmp_path)
    with pytest.raises(ValueError, match="info must be JSON-able"):
        save(_tiny(), tmp_path / "x", info={"f": object()})


def test_unfinished_checkpoints_are_never_loaded(tmp_path):
    import shutil

    model = _tiny()
    rtn_quantize(model, "int4:g16")
    out = save(model, tmp_path / "ckpt")
    # what a SIGKILL before the final rename leaves: a hidden partial directory, maybe complete
    partial = tmp_path / ".ckpt2.partial-99999999-abcd"
    shutil.copytree(out, partial)
    with pytest.raises(ValueError, match="unfinished write"):
        load(partial)
    # killed before its metadata (the last file written) was complete
    unfinished = tmp_path / "copy"
    shutil.copytree(out, unfinished)
    (unfinished / checkpoint.META_FILE).unlink()
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        load(unfinished)
    (unfinished / checkpoint.META_FILE).write_text('{"format": "lowbit-mo')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load(unfinished)
    # a truncated array file (a copy cut short)
    shutil.copytree(out, tmp_path / "short")
    arrays = tmp_path / "short" / checkpoint.ARRAYS_FILE
    arrays.write_bytes(arrays.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not a finished checkpoint"):
        load(tmp_path / "short")
    assert load(out) is not None


def test_a_later_save_removes_a_killed_save_partial(tmp_path):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = tmp_path / f".ckpt.partial-{child.pid}-abcd"
    stale.mkdir()
    (stale / checkpoint.ARRAYS_FILE).write_bytes(b"\0" * 8)
    save(_tiny(), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
