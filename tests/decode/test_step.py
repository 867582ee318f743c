"""Decoding through the caches, token by token, against the model's own full forward (float caches),
against the float cache (int8), and against the one-pass emulation used for the paper tables."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.decode.quality import cache_quality, final_hidden, teacher_forced_decode_logits


@pytest.fixture(scope="module")
def full_logits(tiny_model, token_rows):
    return np.asarray(tiny_model(jnp.asarray(token_rows)))


@pytest.mark.parametrize("contiguous", [False, True])  # paged in pages of 4 tokens / dense rows
def test_float_cache_decode_equals_full_forward(tiny_model, token_rows, full_logits, contiguous):
    decoded = teacher_forced_decode_logits(tiny_model, token_rows, "f32", page_size=4, contiguous=contiguous)
    np.testing.assert_allclose(decoded, full_logits, rtol=1e-4, atol=1e-4)


def test_int8_cache_stays_close_to_the_float_cache(tiny_model, token_rows, full_logits):
    decoded = teacher_forced_decode_logits(tiny_model, token_rows, "int8")
    error = np.abs(decoded - full_logits).max()
    assert 0 < error < 0.05 * np.abs(full_logits).max()
    assert (decoded.argmax(-1) == full_logits.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("layout, policy", [
    ("kivi2:g16:r16", None),        # keys per channel (groups of 16), values per token, residual 16
    ("kivi2:g16:r0", None),         # no residual: the partial key group quantized on the fly
    ("kivi4:g16:swap:r16", None),   # keys per token, values per channel
    ("int4:g16", "sinks:4,window:20"),  # StreamingLLM, positions re-assigned
    ("int8", "window:24"),
])
def test_one_pass_emulation_equals_token_by_token_decoding(one_block_model, token_rows, layout, policy):
    rows = token_rows[:, :48]
    decoded = teacher_forced_decode_logits(one_block_model, rows, layout, policy)
    emulated = np.asarray(one_block_model.head(final_hidden(one_block_model, rows, layout, policy)))
    np.testing.assert_allclose(emulated, decoded, rtol=1e-4, atol=1e-4)


def test_emulated_streaming_equals_decoding_through_several_blocks(tiny_model, token_rows):
    rows = token_rows[:, :48]
    decoded = teacher_forced_decode_logits(tiny_model, rows, "f32", "sinks:4,window:20")
    emulated = np.asarray(tiny_model.head(final_hidden(tiny_model, rows, "f32", "sinks:4,window:20")))
    np.testing.assert_allclose(emulated, decoded, rtol=1e-4, atol=1e-4)


def test_kivi_residual_window_is_exact_and_cache_quality_orders_as_expected(tiny_model, token_rows):
    windows = token_rows[:, :64]
    results = cache_quality(tiny_model, windows, {
        "f32": ("f32", None), "int8": ("int8", None), "kivi2-r64": ("kivi2:g16:r64", None),
        "kivi2-r0": ("kivi2:g16:r0", None)})
    assert results["f32"].kl < 1e-6 and results["f32"].top1 == 1.0
    assert results["kivi2-r64"].kl < 1e-6  # every token of a 64-token window is still in the residual
    assert results["int8"].kl < results["kivi2-r0"].kl
    assert results["f32"].tokens == 2 * 63
