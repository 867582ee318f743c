"""Activation statistics: kurtosis from power sums, outlier dimensions (LLM.int8()'s rule), and
the per-layer statistics of a tiny model with a planted outlier feature."""

import json

import numpy as np
import pytest
from flax import nnx

from lowbit.ptq.activations import (activation_statistics, kurtosis_from_moments,
                                     outlier_dimensions, plot, save_json)
from lowbit.models.llama import Llama, LlamaConfig


@pytest.mark.parametrize("sample, expected", [
    (lambda rng: rng.normal(1.5, 2.0, 400_000), 3.0),
    (lambda rng: rng.laplace(0.0, 1.0, 400_000), 6.0),
    (lambda rng: rng.uniform(-1.0, 1.0, 400_000), 1.8),
])
def test_kurtosis_of_known_distributions(sample, expected):
    x = sample(np.random.default_rng(0))
    moments = [x.sum(), (x ** 2).sum(), (x ** 3).sum(), (x ** 4).sum()]
    assert kurtosis_from_moments(moments, x.size) == pytest.approx(expected, rel=0.05)


def _entry(tokens, counts):
    return {"tokens": tokens, "outlier_tokens_per_feature": counts}


def test_outlier_dimensions_follow_the_layer_and_token_shares():
    # 4 layers x 2 groups = 8 inputs of 100 tokens each.
    layers = [{"attn_in": _entry(100, {5: 50, 9: 1}), "mlp_in": _entry(100, {5: 30})}
              for _ in range(2)]
    layers += [{"attn_in": _entry(100, {}), "mlp_in": _entry(100, {7: 100})} for _ in range(2)]
    dims = {d["feature"]: d for d in outlier_dimensions(layers)}
    assert dims[5]["layer_share"] == 0.5 and dims[5]["token_share"] == pytest.approx(0.4)
    assert dims[5]["systematic"]
    assert dims[7]["layer_share"] == 0.25 and dims[7]["token_share"] == pytest.approx(1.0)
    assert dims[7]["systematic"]
    assert dims[9]["layer_share"] == 0.25 and not dims[9]["systematic"]  # 1% of tokens
    assert [d["feature"] for d in outlier_dimensions(layers)][0] == 5


def test_planted_outlier_feature_is_found_in_every_layer(tmp_path):
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    feature = 11
    for block in model.layers:
        weight = np.asarray(block.attn_norm.weight[...]).copy()
        weight[feature] = 400.0  # RMSNorm output ~ N(0, 1) per feature, times 400
        block.attn_norm.weight.set_value(weight)
    tokens = np.random.default_rng(1).integers(0, 128, (2, 32)).astype(np.int32)
    stats = activation_statistics(model, tokens, batch_size=2, progress=False)
    for layer in stats["layers"]:
        attn = layer["attn_in"]
        assert feature in attn["outlier_features"]
        assert attn["absmax"] >= 6.0 and attn["kurtosis"] > 10.0
        assert attn["tokens"] == 64
        assert attn["percentiles"]["50.0"] <= attn["percentiles"]["99.99"] <= attn["absmax"]
    top = stats["outlier_dimensions"][0]
    assert top["feature"] == feature and top["layer_share"] >= 0.5 and top["systematic"]
    path = save_json(stats, tmp_path / "a" / "activations.json")
    assert json.loads(path.read_text())["layers"][0]["attn_in"]["outlier_features"] == \
        stats["layers"][0]["attn_in"]["outlier_features"]
    image = plot(stats, tmp_path / "a" / "activations.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.model
def test_lowbit_activations_on_smollm2(smollm2_path, tmp_path, capsys):
    from lowbit.cli import main

    assert main(["activations", "--calib-samples", "2", "--calib-len", "128",
                 "--out", str(tmp_path), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert len(stats["layers"]) == 30 and (tmp_path / "activations.png").exists()
    down = [layer["mlp_hidden"]["absmax"] for layer in stats["layers"]]
    q_in = [layer["attn_in"]["absmax"] for layer in stats["layers"]]
    # SmolLM2's down-projection inputs hold the large outliers, not the normed q/k/v inputs
    assert max(down) > 100 and max(down) > 10 * max(q_in)
