"""The sequential driver: captured inputs, propagation through processed blocks, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.ptq.driver import (ABS_MAX, ABS_SUM, COUNT, XTX, BlockCalibration, check_calibration,
                               embed_calibration, module_at, replace_module, run_sequential,
                               strided_sample)


def _manual_inputs(block, x):
    """The four linear inputs of a block computed by hand: [tokens, features] each."""
    positions = jnp.arange(x.shape[1])[None]
    attn_in = block.attn_norm(x)
    h = x + block.attn(attn_in, positions)
    mlp_in = block.ffn_norm(h)
    hidden = jax.nn.silu(block.mlp.w_gate(mlp_in)) * block.mlp.w_up(mlp_in)
    return {"attn_in": attn_in, "mlp_in": mlp_in, "mlp_hidden": hidden}


def test_statistics_match_a_manual_forward(make_tiny, calibration):
    model = make_tiny()
    inputs = embed_calibration(model, calibration, batch_size=3)
    context = BlockCalibration(0, model.layers[0], inputs, batch_size=3)  # 3 does not divide 4
    stats = context.statistics({"attn_in": (XTX, COUNT, ABS_MAX), "mlp_in": (ABS_SUM,),
                                "mlp_hidden": (XTX, strided_sample(5))})
    manual = {k: np.asarray(v).reshape(-1, v.shape[-1])
              for k, v in _manual_inputs(model.layers[0], jnp.asarray(inputs)).items()}
    a = manual["attn_in"]
    np.testing.assert_allclose(stats["attn_in"]["xtx"], a.T @ a, rtol=1e-4, atol=1e-3)
    assert float(stats["attn_in"]["count"]) == 4 * 32
    np.testing.assert_allclose(stats["attn_in"]["abs_max"], np.abs(a).max(0), rtol=1e-5)
    np.testing.assert_allclose(stats["mlp_in"]["abs_sum"], np.abs(manual["mlp_in"]).sum(0),
                               rtol=1e-4)
    d = manual["mlp_hidden"]
    np.testing.assert_allclose(stats["mlp_hidden"]["xtx"], d.T @ d, rtol=1e-4, atol=1e-4)
    # strided per batch of 3 sequences (96 tokens) then 1 sequence (32 tokens)
    expected = np.concatenate([d[:96][::5], d[96:][::5]])
    # (the batched forward and the manual one round differently: 1.7e-6 apart once in CI-like runs)
    np.testing.assert_allclose(stats["mlp_hidden"]["rows_every_5"], expected, rtol=1e-4,
                               atol=1e-5)


def test_linear_inputs_are_the_raw_inputs(make_tiny, calibration):
    model = make_tiny()
    inputs = embed_calibration(model, calibration, batch_size=2)
    context = BlockCalibration(0, model.layers[0], inputs, batch_size=2)
    got = context.linear_inputs(("attn_in", "mlp_hidden"), sequences=3)
    manual = _manual_inputs(model.layers[0], jnp.asarray(inputs[:3]))
    assert got["attn_in"].shape == (3, 32, 64)
    np.testing.assert_allclose(got["attn_in"], manual["attn_in"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["mlp_hidden"], manual["mlp_hidden"], rtol=1e-4, atol=1e-5)


def test_blocks_see_the_outputs_of_processed_blocks(make_tiny, calibration):
    model = make_tiny()
    seen = []

    def process(context):
        seen.append(context.inputs.copy())
        wq = module_at(context.block, "attn.wq")
        wq.kernel.set_value(wq.kernel[...] * 0.5)  # "quantize" the block
        return context.index

    assert run_sequential(model, calibration, process, batch_size=4, progress=False) == [0, 1]
    x = model.embed_tokens(jnp.asarray(calibration))
    np.testing.assert_allclose(seen[0], x, rtol=1e-6)
    after_first = model.layers[0](x, jnp.arange(32)[None])  # the modified block 0
    np.testing.assert_allclose(seen[1], after_first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (None, "required"),
    (np.zeros((0, 16), np.int32), "empty"),
    (np.zeros((16,), np.int32), r"\[samples, seq\]"),
    (np.zeros((4, 1), np.int32), "too short"),
    (np.zeros((2, 4), np.float32), "integers"),
    (np.full((2, 4), 500), "vocab_size"),
    (np.zeros((1, 200), np.int32), "max_seq_len"),
    (np.full((4, 32), 62, np.int32), "token id 62 is 100% of the calibration tokens"),
    (np.r_[np.full(70, 5), np.arange(58)].reshape(4, 32), "token id 5 is 55%"),
])
def test_bad_calibration(make_tiny, bad, message):
    model = make_tiny()
    with pytest.raises(ValueError, match=message):
        check_calibration(bad, model.config)
    with pytest.raises(ValueError):
        run_sequential(model, bad, lambda c: None, progress=False)


def test_module_paths(make_tiny):
    model = make_tiny()
    assert module_at(model, "layers.1.mlp.w_up") is model.layers[1].mlp.w_up
    replacement = module_at(model, "layers.0.mlp.w_up")
    replace_module(model, "layers.1.mlp.w_up", replacement)
    assert model.layers[1].mlp.w_up is replacement
    for bad in ("layers.9.attn.wq", "layers.0.attn.nope"):
        with pytest.raises(ValueError, match="no module"):
            module_at(model, bad)
    with pytest.raises(ValueError, match="no module"):
        replace_module(model, "layers.0.attn.nope", replacement)
    with pytest.raises(ValueError, match="combine"):
        strided_sample(2).__class__("x", np.sum, "mean")
    with pytest.raises(ValueError, match="input group"):
        BlockCalibration(0, model.layers[0], np.zeros((1, 4, 64), np.float32), 1).statistics(
            {"nope": (COUNT,)})


def test_a_file_of_nul_bytes_is_refused_as_calibration(make_tiny, tmp_path):
    from lowbit.data.corpus import calibration_tokens

    class BytesAsIds:  # the SmolLM2 tokenizer also maps every NUL byte to one id (190)
        def encode(self, text):
            return list(text.encode("utf-8"))

    nul = tmp_path / "nul.txt"
    nul.write_bytes(bytes(4096))  # valid UTF-8, not blank to str.strip()
    tokens = calibration_tokens(BytesAsIds(), str(nul), samples=4, length=32)
    with pytest.raises(ValueError, match="token id 0 is 100% .*NUL bytes"):
        check_calibration(tokens, make_tiny().config)
    text = tmp_path / "text.txt"
    text.write_text("Calibration needs ordinary, varied text; this sentence is such text. " * 40)
    tokens = calibration_tokens(BytesAsIds(), str(text), samples=4, length=32)
    assert check_calibration(tokens, make_tiny().config).shape == (4, 32)
