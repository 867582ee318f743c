import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn import (BinaryLinear, BitLinear, QuantLinear, QuantRule, preset_rules, quantize_model,
                       unmatched_rules)

CONFIG = LlamaConfig.tiny(n_layers=2, vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64)


def _model():
    return Llama(CONFIG, rngs=nnx.Rngs(0))


def test_first_matching_rule_wins_and_unmatched_rules_are_listed():
    model = _model()
    rules = [QuantRule(path=r"layers\.0\.attn\.w[qkv]", layer=BitLinear),
             QuantRule(path=r"layers\.\d+\.attn\..*", weight_spec="int4:channel"),
             QuantRule(path=r"layers\.1\.attn\.wq", layer=BinaryLinear),  # shadowed by rule 1
             QuantRule(path=r"lm_head", weight_spec="int8"),  # tied head: no such layer
             QuantRule(path=r"layers\.\d+\.mlp\.w_down", keep_float=True),
             QuantRule(path=r".*", weight_spec="int8:channel")]
    assert unmatched_rules(model, rules) == [rules[2], rules[3]]
    with pytest.warns(UserWarning, match=r"rules matched no layer: \[QuantRule\(path='layers\\\\\.1"):
        report = quantize_model(model, rules)
    assert report.unmatched == (rules[2], rules[3]) and report.unquantized == ()
    assert report.layers["layers.0.attn.wq"] == 0 and report.layers["layers.1.attn.wq"] == 1
    block0, block1 = model.layers[0], model.layers[1]
    assert type(block0.attn.wk) is BitLinear and type(block0.attn.wo) is QuantLinear
    assert str(block0.attn.wo.weight_spec) == "int4:channel" and type(block1.attn.wq) is QuantLinear
    assert type(block1.mlp.w_down) is nnx.Linear and str(block1.mlp.w_up.weight_spec) == "int8:channel"


def test_conversion_is_in_place_and_adopts_the_same_kernel_arrays():
    model = _model()
    before = {path: node.kernel for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)}
    arrays = {path: param[...] for path, param in before.items()}
    quantize_model(model, preset_rules("int4-lsq"))
    after = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, QuantLinear)}
    assert set(after) == set(before)
    for path, layer in after.items():
        assert layer.kernel is before[path]  # the same Param object ...
        assert layer.kernel[...] is arrays[path]  # ... holding the same buffer: no copy


def test_unmatched_rules_can_raise():
    rules = [QuantRule(path=r"layers\.\d+\..*", layer=BitLinear), QuantRule(path=r"decoder\..*", weight_spec="int4")]
    model = _model()
    with pytest.raises(ValueError, match=r"rules matched no layer: \[QuantRule\(path='decoder"):
        quantize_model(model, rules, raise_on_unmatched=True)
    assert all(type(n) is not BitLinear for _, n in nnx.iter_graph(model))


def test_a_spec_a_layer_cannot_take_names_the_rule_and_leaves_the_model_unchanged():
    model = _model()
    rules = [QuantRule(path=r".*attn\.w[qkv]", weight_spec="int4:g16"),
             QuantRule(path=r".*mlp\.w_down", weight_spec="int4:g128")]  # w_down's input is 64 wide
    expected = r"rules\[1\] QuantRule\(path='\.\*mlp\\\\\.w_down'.*layers\.0\.mlp\.w_down.*group_size 128"
    with pytest.raises(ValueError, match=expected):
        quantize_model(model, rules)
    assert not any(isinstance(n, QuantLinear) for _, n in nnx.iter_graph(model))


@pytest.mark.parametrize("fields, message", [
    (dict(path="layers.(\\d+", weight_spec="int4"), "not a valid regex"),
    (dict(path=".*", weight_spec="int5:g0"), "weight_spec"),
    (dict(path=".*", weight_spec="int4", estimator="lsqq"), "estimator must be one of"),
    (dict(path=".*", weight_spec="int4", act_estimator="max"), "act_estimator must be one of"),
    (dict(path=".*", layer="ternary"), "layer must be one of"),
    (dict(path=".*"), "needs a weight_spec"),
])
def test_bad_rules_raise_value_errors_naming_the_rule(fields, message):
    with pytest.raises(ValueError, match=message) as info:
        QuantRule(**fields)
    assert "QuantRule(path=" in str(info.value)


def test_rules_are_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        QuantRule(".*", "int4")  # noqa
    rule = QuantRule(path=".*", weight_spec="int4", layer="quant")
    with pytest.raises(AttributeError):
        rule.path = "x"
    assert rule.layer is QuantLinear and str(rule.weight_spec) == "int4"


def test_eight_bit_conversion_stays_close_to_the_float_model():
    model = _model()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    forward = jax.jit(lambda graphdef, state, t: nnx.merge(graphdef, state)(t), static_argnums=0)
    reference = np.asarray(forward(*nnx.split(model), tokens))
    quantize_model(model, preset_rules("w8a8"))  # int8 per-channel weights, int8 per-token inputs
    out = np.asarray(forward(*nnx.split(model), tokens))
    rel = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    # stated tolerance: 5% relative L2 error of the logits (measured: 2.3%; int8 weights alone
    # give 1.7% on this random 2-block model), probabilities within 0.01, argmax mostly kept
    assert rel < 0.05
    assert (out.argmax(-1) == reference.argmax(-1)).mean() >= 0.9
    def probs(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    assert np.abs(probs(out) - probs(reference)).max() < 0.01
