import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn import (BinaryLinear, BitLinear, PackedLinear, QuantLinear, QuantRule, calibrate, freeze,
                       pack_layer, preset_rules, quantize_model)
from lowbit.nn.packed_linear import PackedWeight


def _arr(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


IN, OUT = 40, 12


CASES = [
    # (layer factory, ternary format, bytes of codes per output column, scales, offsets)
    (lambda k: BitLinear(IN, OUT, kernel=k), "int2", math.ceil(IN / 4), 1, 0),
    (lambda k: BitLinear(IN, OUT, kernel=k), "base3", math.ceil(IN / 5), 1, 0),
    (lambda k: BinaryLinear(IN, OUT, kernel=k), "int2", math.ceil(IN / 8), 1, 0),
    (lambda k: QuantLinear(IN, OUT, weight_spec="int4:channel", estimator="lsq", act_spec="int4",
                           kernel=k), "int2", math.ceil(IN / 2), OUT, 0),
    (lambda k: QuantLinear(IN, OUT, weight_spec="int4:g8:asym", act_spec="int8:token", kernel=k),
     "int2", math.ceil(IN / 2), 5 * OUT, 5 * OUT),
    (lambda k: QuantLinear(IN, OUT, weight_spec="int3:channel", act_spec="int4", act_estimator="pact",
                           act_clip_init=2.0, kernel=k), "int2", 3 * math.ceil(IN / 8), OUT, 0),
    (lambda k: QuantLinear(IN, OUT, weight_spec="int8:channel", act_spec="int8:token:f32", kernel=k),
     "int2", IN, OUT, 0),
    (lambda k: QuantLinear(IN, OUT, weight_spec="int2:g20", estimator="lsq", kernel=k, use_bias=True),
     "int2", math.ceil(IN / 4), 2 * OUT, 0),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_packed_layer_matches_fake_quant_and_its_bytes_match_the_accounting(case):
    factory, ternary, code_bytes, n_scales, n_zeros = CASES[case]
    layer = factory(_arr((IN, OUT), case, 0.2))
    x = _arr((2, 3, IN), 100 + case, 2.0)
    calibrate(layer, x)
    frozen = pack_layer(layer, ternary=ternary)
    np.testing.assert_allclose(np.asarray(frozen(x)), np.asarray(layer(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(frozen.dequantized_kernel()), np.asarray(layer.quantized_kernel()),
                               rtol=1e-6, atol=1e-7)
    expected = code_bytes * OUT + 2 * (n_scales + n_zeros)
    assert frozen.nbytes == expected
    assert frozen.bits_per_weight == pytest.approx(8 * expected / (IN * OUT))
    held = sum(np.asarray(v).nbytes for v in jax.tree.leaves(nnx.state(frozen, PackedWeight)))
    bias_bytes = OUT * 4 if layer.bias is not None else 0
    assert held == expected + bias_bytes  # the layer holds exactly the accounted bytes


def test_ternary_base3_packs_to_about_1_6_bits_and_kernel_formats_use_the_op():
    layer = BitLinear(320, 64, kernel=_arr((320, 64), 0))
    base3 = pack_layer(layer, ternary="base3")
    assert base3.bits_per_weight == pytest.approx(1.6 + 16 / (320 * 64))
    assert not base3.uses_kernel
    int2 = pack_layer(layer, ternary="int2")
    assert int2.bits_per_weight == pytest.approx(2.0 + 16 / (320 * 64))
    assert int2.uses_kernel  # the packed_matmul op takes 2-bit ternary, int4, int2 and binary
    x = _arr((5, 320), 1)
    np.testing.assert_allclose(np.asarray(base3(x)), np.asarray(int2(x)), rtol=1e-5, atol=1e-5)


def test_freeze_a_model_keeps_its_outputs_and_reports_its_bytes():
    config = LlamaConfig.tiny(n_layers=1, vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    model = Llama(config, rngs=nnx.Rngs(0))
    rules = [QuantRule(path=r"layers\.0\.attn\..*", layer=BitLinear),
             QuantRule(path=r".*w_down", weight_spec="int4:channel", estimator="lsq"),
             QuantRule(path=r".*", weight_spec="int4:g16")]
    quantize_model(model, rules)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)
    forward = jax.jit(lambda graphdef, state, t: nnx.merge(graphdef, state)(t), static_argnums=0)
    before = np.asarray(forward(*nnx.split(model), tokens))
    summary = freeze(model, ternary="base3")
    assert summary.layers == 7 and summary.weights == 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64
    packed = [node for _, node in nnx.iter_graph(model) if isinstance(node, PackedLinear)]
    assert len(packed) == 7 and not any(isinstance(n, QuantLinear) for _, n in nnx.iter_graph(model))
    assert summary.nbytes == sum(p.nbytes for p in packed)
    held = sum(np.asarray(v).nbytes for v in jax.tree.leaves(nnx.state(model, PackedWeight)))
    assert held == summary.nbytes
    # outputs agree up to rounding flips of the int8 activations in the ternary layers
    np.testing.assert_allclose(np.asarray(forward(*nnx.split(model), tokens)), before, rtol=1e-3, atol=1e-3)


def test_freeze_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ternary must be one of"):
        freeze(nnx.List([BitLinear(8, 4, rngs=nnx.Rngs(0))]), ternary="base4")
    with pytest.raises(ValueError, match="packed must be a PackedArray"):
        PackedLinear(np.zeros((4, 4)))


def test_pack_freeze_and_packed_layer_default_to_the_ternary_format_the_kernel_runs():
    import inspect

    from lowbit.core.packing import pack
    from lowbit.core.quantize import quantize
    from lowbit.kernels.packed_matmul import packed_matmul
    from lowbit.nn import packed_layer

    default = inspect.signature(pack).parameters["ternary"].default
    assert default == "int2"
    assert inspect.signature(freeze).parameters["ternary"].default == default
    assert inspect.signature(pack_layer).parameters["ternary"].default == default
    w = _arr((64, 8), 0)
    packed = pack(quantize(w, "ternary"), ternary=default)
    q = quantize(w, "ternary")
    x = _arr((3, 64), 1)
    np.testing.assert_allclose(np.asarray(packed_matmul(x, pack(q))), np.asarray(x @ q.dequantize()),
                               rtol=1e-5, atol=1e-5)  # the default packing runs in the kernel
    assert packed_layer(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), q).format == packed.format == "int2"
    model = nnx.List([BitLinear(64, 8, kernel=w)])
    freeze(model)
    assert model[0].format == "int2" and model[0].uses_kernel
