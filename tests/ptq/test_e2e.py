"""E2E-QP (scales trained end to end by distillation) on the tiny Llama: the KL to the teacher
falls, only the scales change (codes and offsets bit-identical), the result saves and runs packed,
a resumed run equals an uninterrupted one; the recipes' ternary storage keeps the weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit
from lowbit.nn import QuantRule
from lowbit.nn.packed_layer import PackedLayer
from lowbit.ptq import e2e
from lowbit.ptq.driver import LLAMA_BLOCK_LINEARS
from lowbit.ptq.e2e import ScaleTrainingLayer, e2e_train, trainable_layers
from lowbit.ptq.methods import quantize
from lowbit.ptq.recipes import RECIPES, get_recipe, run_recipe, store_as_ternary
from lowbit.ptq.targets import replace_module

FAST = {"steps": 12, "learning_rate": 1e-2, "batch_size": 2, "progress": False}


def _quantized(make_tiny, spec="int3:g16:asym", rotate=False, calibration=None):
    model = make_tiny()
    method = "gptq" if rotate else "rtn"
    batches = None if calibration is None else [calibration[:2], calibration[2:]]
    quantize(model, QuantRule(path=LLAMA_BLOCK_LINEARS, weight_spec=spec), method, batches,
             rotate=rotate)
    return model


def _kl(model, teacher, tokens):
    log_p = jax.nn.log_softmax(teacher(tokens), -1)
    log_q = jax.nn.log_softmax(model(tokens), -1)
    return float(jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)))


def _arrays(layers, name):
    return {p: None if getattr(l, name) is None else np.asarray(getattr(l, name).get_value()).copy()
            for p, l in layers.items()}


def _float_params(model):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_kl_falls_and_only_the_scales_change(make_tiny, calibration):
    teacher = make_tiny()
    model = _quantized(make_tiny)
    layers = trainable_layers(model)
    assert len(layers) == 14
    codes, zeros, scales = (_arrays(layers, n) for n in ("data", "zero", "scale"))
    others = _float_params(model)
    before = _kl(model, teacher, calibration)
    report = e2e_train(model, teacher, calibration, **FAST)
    after = _kl(model, teacher, calibration)
    # measured: 0.097 -> 0.047 after 12 steps (the training mean over the 2 batches)
    assert report["initial_kl"] == pytest.approx(before, rel=1e-4)
    assert not report["kept_initial"] and report["final_kl"] < 0.7 * report["initial_kl"]
    assert after == pytest.approx(report["final_kl"], rel=1e-3) and after < 0.7 * before
    assert len(report["losses"]) == 12
    assert trainable_layers(model) == layers  # the same packed layers, back in place
    for path, layer in layers.items():
        np.testing.assert_array_equal(np.asarray(layer.data.get_value()), codes[path])
        np.testing.assert_array_equal(np.asarray(layer.zero.get_value()), zeros[path])
        assert layer.scale.get_value().dtype == jnp.float16
    assert any(not np.array_equal(np.asarray(l.scale.get_value()), scales[p])
               for p, l in layers.items())
    for key, value in _float_params(model).items():
        np.testing.assert_array_equal(value, others[key])


@pytest.mark.parametrize("spec, rotate", [("int4:g16", True), ("int3:g32:asym", False)])
def test_the_training_layer_computes_the_packed_layer(make_tiny, calibration, spec, rotate):
    model = _quantized(make_tiny, spec, rotate=rotate, calibration=calibration)
    x = jax.random.normal(jax.random.key(0), (3, 5, 64 if not rotate else 64))
    checked = 0
    for path, layer in trainable_layers(model).items():
        rows = jax.random.normal(jax.random.key(1), (6, layer.in_features))
        np.testing.assert_allclose(np.asarray(ScaleTrainingLayer(layer)(rows)),
                                   np.asarray(layer(rows)), rtol=1e-5, atol=1e-5)
        checked += layer.input_transform is not None
    assert checked == (2 if rotate else 0) and x.shape[-1] == 64


def test_the_training_layers_compute_the_rotated_model_in_memory(make_tiny, calibration, test_tokens):
    """Right after rotation and quantization the MLP is a HadamardMLP, which leaves its transform to
    a w_down that carries one: with the training layers in place (as e2e_train puts them) the model
    computes the same logits, the transform run once (the recipes train this in-memory model)."""
    model = _quantized(make_tiny, "int4:g16", rotate=True, calibration=calibration)
    want = np.asarray(model(test_tokens))
    for path, layer in trainable_layers(model).items():
        replace_module(model, path, ScaleTrainingLayer(layer))
    np.testing.assert_allclose(np.asarray(model(test_tokens)), want, rtol=1e-5, atol=1e-5)


def test_saves_and_runs_packed(make_tiny, calibration, test_tokens, tmp_path):
    teacher = make_tiny()
    model = _quantized(make_tiny, "int4:g16", rotate=True, calibration=calibration)
    e2e_train(model, teacher, calibration, **{**FAST, "steps": 4})
    lowbit.save(model, tmp_path / "q")
    loaded = lowbit.load(tmp_path / "q")
    assert all(isinstance(l, PackedLayer) for l in trainable_layers(loaded).values())
    np.testing.assert_allclose(np.asarray(loaded(test_tokens)), np.asarray(model(test_tokens)),
                               rtol=1e-5, atol=1e-5)


def test_resume_equals_an_uninterrupted_run(make_tiny, calibration, tmp_path, monkeypatch):
    teacher = make_tiny()
    options = {**FAST, "steps": 6, "checkpoint_every": 2}
    whole = _quantized(make_tiny)
    e2e_train(whole, teacher, calibration, **options)
    expected = _arrays(trainable_layers(whole), "scale")

    model = _quantized(make_tiny)
    real_step, calls = e2e._train_step, []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real_step(*args)

    monkeypatch.setattr(e2e, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        e2e_train(model, teacher, calibration, workdir=tmp_path / "w", **options)
    assert all(isinstance(l, PackedLayer) for _, l in _packed(model))  # put back after the error
    monkeypatch.setattr(e2e, "_train_step", real_step)
    report = e2e_train(model, teacher, calibration, workdir=tmp_path / "w", **options)
    assert report["resumed_at"] == 2 and len(report["losses"]) == 6
    for path, scale in _arrays(trainable_layers(model), "scale").items():
        np.testing.assert_array_equal(scale, expected[path])
    with pytest.raises(ValueError, match="other settings"):
        e2e_train(model, teacher, calibration, workdir=tmp_path / "w", **{**options, "steps": 7})


def _packed(model):
    return [(".".join(map(str, p)), m) for p, m in nnx.iter_graph(model)
            if isinstance(m, PackedLayer)]


@pytest.mark.parametrize("options, match", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
    ({"batch_size": 1.5}, "batch_size must be a positive integer"),
    ({"kl_batches": 0}, "kl_batches must be None or a positive integer"),
])
def test_bad_options(make_tiny, calibration, options, match):
    model = _quantized(make_tiny)
    with pytest.raises(ValueError, match=match):
        e2e_train(model, make_tiny(), calibration, **{**FAST, **options})


def test_bad_input(make_tiny, calibration):
    with pytest.raises(ValueError, match="no packed int or ternary layer"):
        e2e_train(make_tiny(), make_tiny(), calibration, **FAST)
    model = _quantized(make_tiny)
    with pytest.raises(ValueError, match=r"calibration tokens must lie in \[0, 128\)"):
        e2e_train(model, make_tiny(), calibration + 1000, **FAST)
    with pytest.raises(ValueError, match="calibration must be int tokens"):
        e2e_train(model, make_tiny(), calibration[0], **FAST)


def test_ternary_storage_keeps_three_values_per_group_and_packs_to_the_reported_bits(
        make_tiny, calibration, test_tokens):
    model = _quantized(make_tiny, "int2:g32", rotate=True, calibration=calibration)
    expected = np.asarray(model(test_tokens))
    paths = [p for p, _ in _packed(model)]
    store_as_ternary(model, paths)
    np.testing.assert_allclose(np.asarray(model(test_tokens)), expected, rtol=1e-5, atol=1e-5)
    for path in paths:
        layer = lowbit.ptq.targets.module_at(model, path)
        q = layer.weight_qarray()
        assert layer.format == "base3" and q.spec.kind == "ternary"
        groups = np.asarray(q.codes).reshape(-1, 32, q.shape[1])
        assert set(np.unique(groups)) <= {-1, 0, 1}
        k, n = q.shape
        # 5 codes per byte along K per column, one f16 scale per group of 32
        assert layer.nbytes == n * -(-k // 5) + 2 * n * (k // 32)


def test_a_recipe_runs_quantizes_trains_and_saves(make_tiny, calibration, test_tokens, tmp_path):
    ternary = get_recipe("ternary-blockap")
    assert ternary.method == "blockap" and dict(ternary.options)["init"] == "gptq"
    recipe = dataclasses.replace(ternary, e2e_steps=3, e2e_learning_rate=1e-2,
                                 options=(*ternary.options, ("steps", 4)))  # the last value wins
    teacher, model = make_tiny(), make_tiny()
    result, report = run_recipe(model, recipe, calibration, teacher=teacher,
                                e2e_calibration=calibration, workdir=tmp_path / "work", progress=False)
    assert result.method == "recipe:ternary-blockap" and result.settings["recipe"]["e2e_steps"] == 3
    assert sorted(p.name for p in (tmp_path / "work" / "block-ap").glob("block-*.npz")) == [
        f"block-{i:04d}.npz" for i in range(len(model.layers))]  # Block-AP's blocks, resumable
    for _, layer in _packed(model):  # three levels per group, stored as ternary codes
        q = layer.weight_qarray()
        assert q.spec.kind == "ternary" and set(np.unique(np.asarray(q.codes))) <= {-1, 0, 1}
    assert report["steps"] == 3 and report["final_kl"] <= report["initial_kl"]
    assert result.bits_per_weight == pytest.approx(
        sum(8 * l.nbytes for _, l in _packed(model)) /
        sum(l.in_features * l.out_features for _, l in _packed(model)))
    assert result.bits_per_weight < 2.0
    lowbit.save(model, tmp_path / "r")
    np.testing.assert_allclose(np.asarray(lowbit.load(tmp_path / "r")(test_tokens)),
                               np.asarray(model(test_tokens)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="give teacher="):
        run_recipe(make_tiny(), recipe, calibration)
    with pytest.raises(ValueError, match="recipe must be one of"):
        get_recipe("w5")


def test_recipes_state_their_bits():
    assert {name: r.bits_per_weight() for name, r in RECIPES.items()} == {
        "w4": 4.25, "w3": 3.25, "w2": 2.25, "ternary": pytest.approx(1.6 + 0.25),
        "w2-blockap": 2.25, "ternary-blockap": pytest.approx(1.6 + 0.25)}
