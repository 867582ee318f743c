"""RTN with super-block scales on a tiny Llama: packed layers hold the 6-bit scale codes, run
(packed kernel and dequant) as the dequantized reference, and save / load exactly."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.checkpoint import layer_bytes, load, save
from lowbit.core.packing import storage_bits
from lowbit.nn.packed_layer import PackedLayer
from lowbit.ptq.driver import linear_paths, module_at
from lowbit.ptq.rtn import rtn_quantize

SPECS = ["int4:g16:ss64", "int4:g16:ss64:asym", "int3:g16:ss64"]


@pytest.mark.parametrize("spec", SPECS)
def test_packed_forward_equals_the_dequantized_reference(make_tiny, spec):
    model = make_tiny()
    result = rtn_quantize(model, spec)
    rng = np.random.default_rng(0)
    for path in linear_paths(len(model.layers))[:4]:
        layer = module_at(model, path)
        assert isinstance(layer, PackedLayer)
        q = result.linears[path].weight
        assert layer.bits_per_weight == storage_bits(q.spec, q.shape) / q.size
        x = jnp.asarray(rng.normal(size=(3, layer.in_features)), jnp.float32)
        reference = x @ q.dequantize()
        np.testing.assert_allclose(layer(x), reference, atol=2e-5, rtol=1e-5)
        np.testing.assert_array_equal(layer.dequantized_matrix(), q.dequantize())
    assert module_at(model, "layers.0.attn.wq").uses_kernel == (not spec.startswith("int3"))


@pytest.mark.parametrize("runtime", ["packed", "dequant"])
def test_save_load_round_trip(make_tiny, test_tokens, tmp_path, runtime):
    model = make_tiny()
    result = rtn_quantize(model, "int4:g16:ss64:asym", runtime=runtime)
    logits = np.asarray(model(test_tokens))
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt", runtime=runtime)
    np.testing.assert_array_equal(np.asarray(loaded(test_tokens)), logits)
    written = layer_bytes(tmp_path / "ckpt")
    for path in linear_paths(len(model.layers)):
        q = result.linears[path].weight
        assert written[path] == module_at(model, path).nbytes == storage_bits(q.spec, q.shape) // 8
        restored = module_at(loaded, path)
        matrix = restored.dequantized_matrix() if runtime == "packed" else restored.kernel[...]
        np.testing.assert_array_equal(matrix, q.dequantize())
