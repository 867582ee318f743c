"""AWQ: scale search never loses to RTN, wins with salient channels, clipping, GQA skip."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec
from lowbit.ptq.awq import (AWQ_GRID, awq_quantize, awq_scales, check_awq_spec, clip_weight,
                            search_clip, search_scales)
from lowbit.ptq.driver import embed_calibration
from lowbit.ptq.rtn import rtn_quantize

SALIENT = np.array([3, 17, 40, 55])


def _salient(model):
    """Makes 4 of 64 channels of every norm output 8x larger (AWQ's salient channels)."""
    for block in model.layers:
        for norm in (block.attn_norm, block.ffn_norm):
            w = np.asarray(norm.weight[...]).copy()
            w[SALIENT] *= 8.0
            norm.weight.set_value(jnp.asarray(w))
    return model


def test_scales_are_normalized():
    mean_abs = jnp.asarray([0.1, 1.0, 4.0, 0.0])
    assert np.allclose(awq_scales(mean_abs, 0.0), 1.0)
    s = np.asarray(awq_scales(mean_abs, 0.5))
    assert s.max() * s.min() == pytest.approx(1.0, rel=1e-5)
    assert np.all(s > 0)
    assert AWQ_GRID[0] == 0.0 and len(AWQ_GRID) == 20 and AWQ_GRID[-1] == pytest.approx(0.95)


def test_block_mse_below_rtn_with_salient_channels(make_tiny, calibration):
    spec = "int3:g16:asym"
    reference = _salient(make_tiny(n_layers=1))
    x = jnp.asarray(embed_calibration(reference, calibration, 4))
    positions = jnp.arange(x.shape[1])[None]
    target = reference.layers[0](x, positions)
    awq_model = _salient(make_tiny(n_layers=1))
    result = awq_quantize(awq_model, calibration, spec, progress=False, search_tokens=128,
                          clip_tokens=64)
    rtn_model = _salient(make_tiny(n_layers=1))
    rtn_quantize(rtn_model, spec)
    awq_mse = float(jnp.mean((awq_model.layers[0](x, positions) - target) ** 2))
    rtn_mse = float(jnp.mean((rtn_model.layers[0](x, positions) - target) ** 2))
    assert awq_mse < 0.7 * rtn_mse
    report = result.block_reports[0]
    for group in ("attn_in", "mlp_in", "mlp_hidden"):
        # alpha = 0 (plain RTN scales) is in the grid, so the search never does worse.
        assert report[group]["loss"] <= report[group]["rtn_loss"]
        assert report[group]["alpha"] > 0.0
    # GQA (4 query heads over 2 KV heads): v's output (32) != o's input (64): no v->o scaling.
    assert "GQA" in report["attn_out"]["skipped"]
    # The model holds the dequantized QArrays; q/k are not clipped.
    for path, entry in result.linears.items():
        assert entry.report.get("clipped", False) == (path.split(".")[-1] not in ("wq", "wk"))


def test_v_to_o_scaling_without_gqa(make_tiny, calibration):
    model = make_tiny(n_layers=1, n_kv_heads=4)
    result = awq_quantize(model, calibration, "int4:g16:asym", progress=False,
                          search_tokens=64, clip=False)
    report = result.block_reports[0]["attn_out"]
    assert report["loss"] <= report["rtn_loss"]


def test_search_scales_never_worse_than_alpha_zero(make_tiny, calibration):
    model = _salient(make_tiny(n_layers=1))
    block = model.layers[0]
    x = block.attn_norm(jnp.asarray(embed_calibration(model, calibration, 4)))
    mean_abs = jnp.abs(x).reshape(-1, 64).mean(0)
    alpha, scales, losses = search_scales(block.attn, "attention", ("wq", "wk", "wv"), x,
                                          mean_abs, QuantSpec.parse("int3:g16"))
    assert losses.shape == (20,)
    assert losses.min() == losses[AWQ_GRID.index(alpha)] <= losses[0]
    np.testing.assert_allclose(scales, awq_scales(mean_abs, alpha))


def test_clip_search_never_worse_than_no_clipping():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (48, 16)).astype(np.float32)  # heavy tails: clipping helps
    x = rng.standard_normal((256, 48)).astype(np.float32)
    spec = QuantSpec.parse("int3:g16:asym")
    limit = np.asarray(search_clip(w, x, spec))
    assert limit.shape == (3, 16)
    amax = np.abs(w).reshape(3, 16, 16).max(1)
    assert np.all(limit <= amax + 1e-6) and np.all(limit >= 0.5 * amax - 1e-6)
    assert np.any(limit < amax)
    clipped = np.asarray(quantize(clip_weight(jnp.asarray(w), limit, spec), spec).dequantize())
    plain = np.asarray(quantize(w, spec).dequantize())
    for g in range(3):
        rows = slice(16 * g, 16 * (g + 1))
        err_clip = ((x[:, rows] @ (clipped[rows] - w[rows])) ** 2).mean(0)
        err_plain = ((x[:, rows] @ (plain[rows] - w[rows])) ** 2).mean(0)
        assert np.all(err_clip <= err_plain * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("spec", ["ternary", "binary", "fp8_e4m3", "int4:token"])
def test_specs_awq_cannot_do(spec):
    with pytest.raises(ValueError):
        check_awq_spec(spec)


def test_bad_arguments(make_tiny, calibration):
    model = make_tiny(n_layers=1)
    with pytest.raises(ValueError, match="grid"):
        awq_quantize(model, calibration, "int4:g16", grid=(), progress=False)
    with pytest.raises(ValueError, match="grid"):
        awq_quantize(model, calibration, "int4:g16", grid=(1.5,), progress=False)
    with pytest.raises(ValueError, match="search_tokens"):
        awq_quantize(model, calibration, "int4:g16", search_tokens=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        awq_quantize(model, np.zeros((0, 8), np.int32), "int4:g16", progress=False)
