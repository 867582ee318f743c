import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowbit.core import QuantSpec, pack, quantize
from lowbit.core.quantize import NF4_CODEBOOK
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn import PackedLayer
from lowbit.nn.lora import (LoRA, LoRAConfig, LoRAParam, add_lora, lora_layers, lora_parameter_count,
                            loftq_factors, merge_lora, prepare_qlora, restore_adapters, save_adapters)

# QLoRA (arXiv 2305.14314), Appendix E: the NormalFloat4 values.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


FROZEN = nnx.Not(nnx.Any(LoRAParam, nnx.RngState))  # everything but adapters and the dropout stream


def _tiny(seed=0):
    return Llama(LlamaConfig.tiny(vocab_size=256, n_layers=1), rngs=nnx.Rngs(seed))


def _tokens(shape=(2, 16), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


def _qlora(seed=0, **lora):
    model = _tiny(seed)
    settings = {"rank": 4, "alpha": 8.0}
    settings.update(lora)
    prepare_qlora(model, "nf4:g64:dq", LoRAConfig(**settings), rngs=nnx.Rngs(params=1, dropout=2))
    return model


def _randomize_b(model, seed=3, scale=0.05):
    for i, (_, layer) in enumerate(lora_layers(model)):
        shape = layer.lora_b.get_value().shape
        layer.lora_b.set_value(scale * jax.random.normal(jax.random.key(seed + i), shape))


def test_nf4_code_values_equal_the_published_table():
    np.testing.assert_array_equal(NF4_CODEBOOK, np.asarray(PUBLISHED_NF4, np.float32))
    # REFERENCE.md's 5-digit transcription agrees too
    five = [-1, -0.69619, -0.52507, -0.39492, -0.28444, -0.18477, -0.09105, 0, 0.07958, 0.16093,
            0.24611, 0.33792, 0.44071, 0.56262, 0.72296, 1]
    np.testing.assert_allclose(NF4_CODEBOOK, five, atol=5e-6)
    # a block holding exactly the code values (absmax 1) quantizes to itself
    q = quantize(jnp.asarray(PUBLISHED_NF4 * 4, jnp.float32), "nf4:g64", axis=0)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), np.asarray(PUBLISHED_NF4 * 4, np.float32))


def test_double_quantization_accounts_4_127_bits_per_parameter():
    w = jax.random.normal(jax.random.key(0), (64 * 256, 64))  # 256 blocks of 64 per column
    dq = pack(quantize(w, "nf4:g64:dq", axis=0))
    plain = pack(quantize(w, "nf4:g64:f32", axis=0))
    # QLoRA: fp32 block absmax costs 32/64 = 0.5 bits/param; 8-bit absmax in blocks of 256 with an
    # fp32 second-level constant costs 8/64 + 32/(64*256) = 0.127
    assert plain.bits_per_weight == pytest.approx(4.5, abs=1e-9)
    assert dq.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-4)
    assert round(dq.bits_per_weight, 3) == 4.127


def test_zero_init_starts_equal_to_the_packed_base_and_the_base_is_packed_nf4():
    model = _tiny()
    tokens = _tokens()
    paths = prepare_qlora(model, "nf4:g64:dq", LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    assert len(paths) == 7
    layer = model.layers[0].attn.wq
    assert isinstance(layer, LoRA) and isinstance(layer.base, PackedLayer)
    assert str(layer.base.spec) == "nf4:g64:dq" and layer.base.bits_per_weight < 4.2
    adapted = model(tokens)
    for name, lora in lora_layers(model):
        parent = model
        *head, last = name.split(".")
        for key in head:
            parent = parent[int(key)] if key.isdigit() else getattr(parent, key)
        setattr(parent, last, lora.base)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(model(tokens)))


def test_only_adapter_parameters_receive_gradients_and_change():
    model = _qlora(dropout=0.1)
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, FROZEN))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoRAParam)
    # the optimizer state covers the adapters alone: Adam's two moments per adapter matrix
    moments = [x for x in jax.tree.leaves(nnx.state(optimizer.opt_state)) if np.ndim(x) == 2]
    assert len(moments) == 2 * 2 * 7 and sum(x.size for x in moments) == 2 * lora_parameter_count(model)

    def loss(m, batch):
        logits = m(batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean()

    diff = nnx.DiffState(0, LoRAParam)
    losses = []
    for step in range(4):
        batch = _tokens((4, 16), seed=step)
        value, grads = nnx.value_and_grad(loss, argnums=diff)(model, batch)
        leaves = jax.tree.leaves(grads)
        assert len(leaves) == 14 and all(np.isfinite(np.asarray(g)).all() for g in leaves)
        optimizer.update(model, grads)
        losses.append(float(value))
    # B got a gradient at step 0 (A's is zero while B = 0); after steps both moved
    lora = model.layers[0].mlp.w_down
    assert float(jnp.abs(lora.lora_b[...]).max()) > 0
    frozen_after = jax.tree.map(np.asarray, nnx.state(model, FROZEN))
    before, after = jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)
    assert len(before) == len(after) > 15
    for x, y in zip(before, after):  # packed codes, scales, norms, embeddings: bit-identical
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("spec", [None, "nf4:g64:dq"])
def test_merged_packed_model_equals_base_plus_adapters(spec):
    model = _qlora()
    _randomize_b(model)
    model.eval()
    tokens = _tokens()
    expected = {name: layer.base.dequantized_matrix() + layer.delta_matrix() for name, layer in lora_layers(model)}
    adapted = model(tokens)
    merged = merge_lora(model, spec)
    assert len(merged) == 7 and not lora_layers(model)
    layer = model.layers[0].mlp.w_up
    if spec is None:
        assert type(layer) is nnx.Linear
        np.testing.assert_allclose(layer.kernel[...], expected["layers.0.mlp.w_up"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(model(tokens), adapted, rtol=1e-4, atol=1e-4)
    else:  # re-quantized: within NF4's error of base + adapters
        assert isinstance(layer, PackedLayer) and str(layer.spec) == spec
        target = expected["layers.0.mlp.w_up"]
        err = float(jnp.abs(layer.dequantized_matrix() - target).max())
        block_absmax = float(jnp.abs(target).max())
        assert 0 < err <= 0.5 * (1 - 0.7229568362236023) * block_absmax * 1.01


def test_float_base_merge_unmerge_over_linear_general_einsum_and_conv():
    rngs = nnx.Rngs(0)
    cases = [
        (nnx.Linear(16, 8, rngs=rngs), jnp.ones((3, 16))),
        (nnx.LinearGeneral((4, 8), (2, 6), axis=(-2, -1), rngs=rngs), jax.random.normal(jax.random.key(1), (3, 4, 8))),
        (nnx.Einsum("bd,dhk->bhk", (16, 2, 4), (2, 4), rngs=rngs), jax.random.normal(jax.random.key(2), (3, 16))),
        (nnx.Conv(3, 5, (3, 3), rngs=rngs), jax.random.normal(jax.random.key(3), (2, 6, 6, 3))),
    ]
    for module, x in cases:
        kernel = np.asarray(module.kernel[...])
        layer = LoRA(module, rank=2, alpha=4.0, rngs=nnx.Rngs(5))
        np.testing.assert_array_equal(layer(x), module(x))  # B = 0: the base function
        layer.lora_b.set_value(jax.random.normal(jax.random.key(6), layer.lora_b.get_value().shape))
        adapted = layer(x)
        assert float(jnp.abs(adapted - module(x)).max()) > 1e-3
        layer.merge()
        np.testing.assert_allclose(layer(x), adapted, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(module.kernel[...], kernel + np.asarray(layer.contraction.kernel_from_matrix(
            layer.delta_matrix())), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="already merged"):
            layer.merge()
        layer.unmerge()
        np.testing.assert_allclose(module.kernel[...], kernel, rtol=0, atol=1e-6)
        np.testing.assert_allclose(layer(x), adapted, rtol=1e-5, atol=1e-5)


def test_add_lora_on_an_already_packed_model_and_bad_input():
    model = _tiny()
    for block in model.layers:  # pack the block linears first (as PTQ would)
        for parent, name in ((block.attn, "wq"), (block.mlp, "w_up")):
            linear = getattr(parent, name)
            from lowbit.nn import packed_layer
            setattr(parent, name, packed_layer(linear, quantize(linear.kernel[...], "int4:g32", axis=0)))
    paths = add_lora(model, LoRAConfig(path=r".*\.(wq|w_up)", rank=2), rngs=nnx.Rngs(0))
    assert paths == ["layers.0.attn.wq", "layers.0.mlp.w_up"]
    with pytest.raises(ValueError, match="already has a LoRA"):
        add_lora(model, LoRAConfig(path=r".*\.wq", rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="matches no linear"):
        add_lora(model, LoRAConfig(path="nothing", rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init='zero'"):
        add_lora(_tiny(), LoRAConfig(init="loftq"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot merge in place"):
        model.layers[0].attn.wq.merge()
    for bad, match in (({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"init": "pissa"}, "init"),
                       ({"path": "("}, "regex"), ({"alpha": 0}, "alpha")):
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**bad)
    with pytest.raises(ValueError, match="unknown LoRA setting"):
        LoRAConfig.from_dict({"rank": 2, "targets": "x"})


def test_adapters_save_and_restore_exactly_without_the_base(tmp_path):
    model = _qlora()
    _randomize_b(model)
    tokens = _tokens()
    model.eval()
    expected = model(tokens)
    directory = save_adapters(model, tmp_path / "adapters")
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size < 4 * lora_parameter_count(model) + 200_000  # adapters only, not the base
    with pytest.raises(ValueError, match="exists"):
        save_adapters(model, directory)
    fresh = _qlora()
    fresh.eval()
    assert not np.array_equal(fresh(tokens), expected)
    restored = restore_adapters(fresh, directory)
    assert len(restored) == 7
    for (_, a), (_, b) in zip(lora_layers(model), lora_layers(fresh)):
        np.testing.assert_array_equal(a.lora_a[...], b.lora_a[...])
        np.testing.assert_array_equal(a.lora_b[...], b.lora_b[...])
    np.testing.assert_array_equal(fresh(tokens), expected)
    with pytest.raises(ValueError, match="do not fit"):
        restore_adapters(_qlora(rank=8), directory)


def test_loftq_initialization_reduces_the_quantization_error():
    w = jax.random.normal(jax.random.key(0), (128, 96)) * 0.05
    spec = QuantSpec.parse("nf4:g64:dq")
    plain = float(jnp.linalg.norm(w - quantize(w, spec, axis=0).dequantize(jnp.float32)))
    errors = []
    for iterations in (1, 3):
        q, a, b = loftq_factors(w, spec, rank=16, scaling=2.0, iterations=iterations)
        errors.append(float(jnp.linalg.norm(w - q.dequantize(jnp.float32) - 2.0 * a @ b)))
    assert errors[0] < 0.9 * plain and errors[1] <= errors[0] * 1.001
    model = _tiny()
    reference = _tiny()
    prepare_qlora(model, "nf4:g64:dq", LoRAConfig(rank=4, init="loftq"), rngs=nnx.Rngs(1))
    layer, original = model.layers[0].mlp.w_gate, reference.layers[0].mlp.w_gate.kernel[...]
    zero = float(jnp.linalg.norm(original - layer.base.dequantized_matrix()))
    loft = float(jnp.linalg.norm(original - layer.base.dequantized_matrix() - layer.delta_matrix()))
    assert loft < zero


def _native_or_skip():
    from lowbit.kernels.native import native_available

    if jax.default_backend() != "cpu" or not native_available():
        pytest.skip("the native CPU kernels are not available here")


def test_gradients_through_lora_over_nf4_equal_the_dequantized_reference():
    """QLoRA's default base (NF4 blocks of 64, double-quantized scales, the native kernels at 80
    rows): the adapter gradients and the input gradient (dy W.T from the packed codes) equal those
    of the same adapter over a float Linear holding the dequantized matrix."""
    _native_or_skip()
    k, n, rank = 192, 80, 4
    x = jnp.asarray(np.random.default_rng(30).standard_normal((2, 40, k)), jnp.float32)
    a = jnp.asarray(np.random.default_rng(31).standard_normal((k, rank)), jnp.float32) / k
    b = jnp.asarray(np.random.default_rng(32).standard_normal((rank, n)), jnp.float32)
    model = nnx.Sequential(nnx.Linear(k, n, rngs=nnx.Rngs(0)))
    prepare_qlora(model, "nf4:g64:dq", LoRAConfig(rank=rank, alpha=8.0, path=r".*"), rngs=nnx.Rngs(1))
    packed = model.layers[0].base
    assert isinstance(packed, PackedLayer) and packed.uses_kernel and packed.impl == "native"
    float_base = nnx.Linear(k, n, rngs=nnx.Rngs(0))
    float_base.kernel.set_value(packed.dequantized_matrix())
    float_base.bias.set_value(packed.bias[...])
    grads = []
    for base in (packed, float_base):
        layer = LoRA(base, rank=rank, alpha=8.0, a=a, b=b, rngs=nnx.Rngs(2))
        graphdef, trained, rest = nnx.split(layer, LoRAParam, ...)

        def loss(trained, x, graphdef=graphdef, rest=rest):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, trained, rest)(x)))

        grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(trained, x))
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)


def _step_temp_bytes(model) -> int:
    graphdef, trained, rest = nnx.split(model, LoRAParam, ...)
    tokens = _tokens((2, 16))

    def loss(trained, rest):
        logits = nnx.merge(graphdef, trained, rest)(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(trained, rest).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_qlora_training_step_holds_no_dequantized_base():
    """XLA's own accounting of the compiled loss-and-gradient step of a small Llama: with the NF4
    base through the native kernels its temporaries exceed LoRA-on-the-float-base's by less than one
    float matrix (none is formed); with each float W formed per call (runtime "dequant") they hold
    more than half of the f32 block linears on top."""
    _native_or_skip()
    config = LlamaConfig.tiny(vocab_size=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=64,
                              ffn_dim=768)
    linear_bytes = 4 * config.n_layers * (4 * 256 * 256 + 3 * 256 * 768)
    largest_matrix = 4 * 256 * 768
    temps = {}
    for runtime in ("packed", "dequant", "float"):
        model = Llama(config, rngs=nnx.Rngs(0))
        if runtime == "float":
            add_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
        else:
            prepare_qlora(model, "nf4:g64:dq", LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1), runtime=runtime)
        temps[runtime] = _step_temp_bytes(model)
    assert temps["packed"] < temps["float"] + largest_matrix, (temps, linear_bytes)
    assert temps["dequant"] > temps["float"] + linear_bytes / 2, (temps, linear_bytes)
