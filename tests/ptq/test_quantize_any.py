"""ptq.quantize on models lowbit has never seen (the NNX MNIST tutorial CNN: Conv + Linear; a small
transformer: Einsum, LinearGeneral, MultiHeadAttention, Linear), saved and loaded in a fresh process."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lowbit.checkpoint import quantized_layers, save
from lowbit.nn import QuantRule
from lowbit.nn.packed_layer import PackedLayer
from lowbit.ptq.methods import get_method, quantize, run_method

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # the foreign models live next to this file, as a user's would
from foreign_models import CNN, TinyTransformer  # noqa: E402
ROOT = HERE.parents[1]


def _images(seed, count=4):
    return np.asarray(jax.random.normal(jax.random.key(seed), (count, 28, 28, 1)))


def _tokens(seed, count=4):
    return np.random.default_rng(seed).integers(0, 64, (count, 16)).astype(np.int32)


def _reload_in_fresh_process(directory, builder: str, inputs: np.ndarray, tmp_path) -> np.ndarray:
    """Loads the checkpoint in a new Python process (only the model's class is shared) and returns
    its output on `inputs`."""
    np.save(tmp_path / "inputs.npy", inputs)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import numpy as np
        from flax import nnx
        import lowbit
        from foreign_models import CNN, TinyTransformer
        model = lowbit.load({str(directory)!r},
                            model=nnx.eval_shape(lambda: {builder}(rngs=nnx.Rngs(0))))
        np.save({str(tmp_path / "outputs.npy")!r},
                np.asarray(model(np.load({str(tmp_path / "inputs.npy")!r}))))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=300,
                   env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
                        "PATH": "/usr/bin:/bin"})
    return np.load(tmp_path / "outputs.npy")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cnn_conv_and_linear_round_trip_in_a_fresh_process(method, tmp_path):
    model = CNN(rngs=nnx.Rngs(0))
    images = _images(1)
    reference = np.asarray(model(images))
    rules = [QuantRule(path="conv1", keep_float=True),  # 9 inputs: too few to quantize
             QuantRule(path="conv2|linear1", weight_spec="int4:g32"),
             QuantRule(path="linear2", weight_spec="int8:channel")]
    calibration = [_images(2), _images(3)] if method == "gptq" else None
    result = quantize(model, rules, method, calibration)
    assert sorted(result.linears) == ["conv2", "linear1", "linear2"]
    assert set(quantized_layers(model)) == {"conv2", "linear1", "linear2"}
    assert isinstance(model.conv1, nnx.Conv) and isinstance(model.conv2, PackedLayer)
    output = np.asarray(model(images))
    relative = np.linalg.norm(output - reference) / np.linalg.norm(reference)
    assert 0 < relative < 0.2
    out = save(model, tmp_path / "cnn")
    np.testing.assert_array_equal(_reload_in_fresh_process(out, "CNN", images, tmp_path), output)


def test_gptq_beats_rtn_on_the_cnn_layer_outputs():
    errors = {}
    for method in ("rtn", "gptq"):
        model = CNN(rngs=nnx.Rngs(0))
        calibration = [_images(2), _images(3)]
        rules = [QuantRule(path="conv1", keep_float=True),
                 QuantRule(path=".*", weight_spec="int3:g32")]
        quantize(model, rules, method, calibration if method == "gptq" else None)
        errors[method] = np.linalg.norm(np.asarray(model(_images(5))) -
                                        np.asarray(CNN(rngs=nnx.Rngs(0))(_images(5))))
    assert errors["gptq"] < errors["rtn"]


def test_transformer_einsum_linear_general_and_attention_round_trip(tmp_path):
    model = TinyTransformer(rngs=nnx.Rngs(0))
    tokens = _tokens(1)
    reference = np.asarray(model(tokens))
    rules = [QuantRule(path=r"head|.*\.mha\..*", keep_float=True),
             QuantRule(path=r"blocks\.\d+\..*", weight_spec="int4:g16")]
    result = quantize(model, rules, "gptq", [_tokens(2), _tokens(3)])
    kinds = {type(layer.contraction).__name__ for layer in quantized_layers(model).values()}
    assert kinds == {"DotContraction", "EinsumContraction"}
    assert {"blocks.0.qkv", "blocks.0.out", "blocks.1.down"} <= set(result.linears)
    assert all(entry.report["output_rel_error"] < 0.05 for entry in result.linears.values())
    output = np.asarray(model(tokens))
    assert np.linalg.norm(output - reference) / np.linalg.norm(reference) < 0.2
    out = save(model, tmp_path / "transformer")
    reloaded = _reload_in_fresh_process(out, "TinyTransformer", tokens, tmp_path)
    np.testing.assert_array_equal(reloaded, output)


def test_rules_errors_and_warnings():
    model = CNN(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rules matched no layer"):
        quantize(model, [QuantRule(path="conv9", weight_spec="int4:g32")])
    with pytest.raises(ValueError, match="group size 64 exceeds the 9 contracted features"):
        quantize(model, [QuantRule(path=".*", weight_spec="int4:g64")])
    with pytest.warns(UserWarning, match=r"match no rule and stay float: \['conv1'"):
        quantize(model, [QuantRule(path="linear.*", weight_spec="int8:channel")])
    last_only = [QuantRule(path="linear2", weight_spec="int8"),
                 QuantRule(path=".*", keep_float=True)]
    with pytest.raises(ValueError, match="calibration must be a list of batches"):
        quantize(CNN(rngs=nnx.Rngs(0)), last_only, "gptq", _images(2))
    with pytest.raises(ValueError, match="runs on the built-in Llama only"):
        quantize(CNN(rngs=nnx.Rngs(0)), last_only, "mixed", [_images(2)], budget=4.0)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(CNN(rngs=nnx.Rngs(0)), last_only, "hqq")


def test_registry_describes_every_method():
    assert get_method("gptq").options()["act_order"] is False
    assert get_method("rtn").check_weights("int4:g64").group_size == 64
    with pytest.raises(ValueError, match="takes no option"):
        get_method("gptq").check_options({"alpha": 0.5})
    with pytest.raises(ValueError, match="needs calibration tokens"):
        run_method("awq", None, "int4:g64", None)
