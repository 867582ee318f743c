import json
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from lowbit.cli import main
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn import PackedLayer
from lowbit.nn.lora import LoRA, lora_layers, restore_adapters
from lowbit.train import finetune as finetune_module
from lowbit.train.finetune import FineTuner, FinetuneConfig

TEXT = ("the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 60)


def _tiny(seed=0):
    return Llama(LlamaConfig.tiny(vocab_size=256, n_layers=1), rngs=nnx.Rngs(seed))


def _tokens():
    data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
    return data[:4000], data[4000:]


def _config(lora=None, **train):
    settings = {"steps": 6, "batch_size": 4, "seq_len": 16, "lr": 1e-2, "warmup_steps": 1, "eval_interval": 3,
                "eval_windows": 4}
    settings.update(train)
    return FinetuneConfig.from_dict({"data": {"tokenizer": "byte"}, "train": settings,
                                     "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, **(lora or {})}})


def _leaves(state):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(state)]


def test_qlora_resume_from_a_checkpoint_is_exact(tmp_path):
    tokens = _tokens()
    straight = FineTuner(_config(), model=_tiny(), tokens=tokens)
    straight.run()
    config = _config(checkpoint_dir=str(tmp_path / "ckpt"))
    first = FineTuner(config, model=_tiny(), tokens=tokens)
    first.run(until_step=3)
    first.close()
    resumed = FineTuner(config, model=_tiny(), tokens=tokens)  # rebuilds the NF4 base, restores step 3
    assert resumed.step == 3 and len(resumed.train_losses) == 3
    resumed.run()
    a, b = _leaves(straight.state()), _leaves(resumed.state())
    assert len(a) == len(b) > 3 * 14  # adapters, the dropout counter, AdamW moments
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert straight.train_losses == resumed.train_losses
    assert [h["eval_loss"] for h in straight.history] == [h["eval_loss"] for h in resumed.history]
    resumed.close()
    with pytest.raises(ValueError, match="lora.rank changed the model's arrays"):
        FineTuner(_config(lora={"rank": 8}, checkpoint_dir=str(tmp_path / "ckpt")), model=_tiny(), tokens=tokens)


def test_only_the_adapters_train_and_the_packed_base_stays_bit_identical():
    tuner = FineTuner(_config(steps=8, eval_interval=0), model=_tiny(), tokens=_tokens())
    model = tuner.model()
    assert all(isinstance(layer.base, PackedLayer) and str(layer.base.spec) == "nf4:g64:dq"
               for _, layer in lora_layers(model)) and len(lora_layers(model)) == 7
    assert tuner.trainable_parameters == sum(4 * (layer.contraction.in_features + layer.contraction.out_features)
                                             for _, layer in lora_layers(model))
    assert tuner.trainable_parameters < 0.2 * tuner.source_parameters
    # the optimizer state covers the adapters alone: two moments per adapter value
    moments = [x for x in _leaves(tuner.opt_state) if x.ndim == 2]
    assert sum(x.size for x in moments) == 2 * tuner.trainable_parameters
    base_before = _leaves(tuner.rest)
    adapters_before = _leaves(tuner.params)
    before = tuner.evaluate()["eval_loss"]
    tuner.run()
    for x, y in zip(base_before, _leaves(tuner.rest)):  # NF4 codes, scales, norms, embedding
        np.testing.assert_array_equal(x, y)
    assert all(not np.array_equal(x, y) for x, y in zip(adapters_before[1::2], _leaves(tuner.params)[1::2]))
    assert tuner.history[-1]["eval_loss"] < before - 0.1


def test_qlora_from_a_gguf_quantizes_its_blocks_without_forming_the_float_model(tmp_path):
    """A quantized base loads the GGUF on its blocks and dequantizes one linear at a time: the same
    NF4 base, adapters and losses as quantizing the f32 load, with no float linear on the way."""
    from lowbit.export import export_gguf
    from lowbit.nn.gguf_layers import GgufEmbed, GgufLinear
    from lowbit.train.finetune import load_source_model

    path = tmp_path / "tiny.gguf"
    export_gguf(_tiny(seed=3), path, "Q4_1")
    on_blocks = load_source_model(str(path), on_blocks=True)
    assert isinstance(on_blocks.layers[0].mlp.w_up, GgufLinear)
    assert isinstance(on_blocks.embed, GgufEmbed)
    config = _config(steps=2, eval_interval=0).replace(model={"name": str(path)})
    loaded = FineTuner(config, tokens=_tokens())
    reference = FineTuner(config, model=load_source_model(str(path)), tokens=_tokens())
    assert loaded.source_parameters == reference.source_parameters
    for state in ("rest", "params"):  # NF4 codes, scales, norms, float embedding; the adapters
        a, b = _leaves(getattr(loaded, state)), _leaves(getattr(reference, state))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    loaded.run()
    reference.run()
    assert loaded.train_losses == reference.train_losses
    assert isinstance(loaded.model().embed, nnx.Embed)


def test_full_and_float_lora_methods_train_what_they_say():
    full = FineTuner(_config({"method": "full", "base": "float", "dropout": 0.0}, steps=2, eval_interval=0),
                     model=_tiny(), tokens=_tokens())
    assert full.trainable_parameters == full.source_parameters
    float_lora = FineTuner(_config({"base": "float"}, steps=2, eval_interval=0), model=_tiny(), tokens=_tokens())
    layer = float_lora.model().layers[0].attn.wq
    assert isinstance(layer, LoRA) and type(layer.base) is nnx.Linear
    kernels = _leaves(nnx.state(float_lora.model(), nnx.Not(nnx.Any(nnx.LoRAParam, nnx.RngState))))
    float_lora.run()
    after = _leaves(nnx.state(float_lora.model(), nnx.Not(nnx.Any(nnx.LoRAParam, nnx.RngState))))
    for x, y in zip(kernels, after):
        np.testing.assert_array_equal(x, y)


def test_finetune_config_rejects_unknown_keys_and_contradictions():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lora.targets'\]"):
        FinetuneConfig.from_dict({"lora": {"targets": "x"}})
    with pytest.raises(ValueError, match="unknown config section"):
        FinetuneConfig.from_dict({"quant": {}})
    with pytest.raises(ValueError, match="lora.base must be 'float'"):
        FinetuneConfig.from_dict({"lora": {"method": "full"}})
    with pytest.raises(ValueError, match="loftq"):
        FinetuneConfig.from_dict({"lora": {"base": "float", "init": "loftq"}})
    with pytest.raises(ValueError, match="lora.base"):
        FinetuneConfig.from_dict({"lora": {"base": "nf5"}})
    with pytest.raises(ValueError, match="lora.rank"):
        FinetuneConfig.from_dict({"lora": {"rank": 0}})
    config = FinetuneConfig.from_dict({})
    assert config.lora.base == "nf4:g64:dq" and config.data.tokenizer == "smollm2" and config.train.lr == 1e-3
    assert FinetuneConfig.from_dict(config.to_dict()) == config


def test_cli_finetunes_saves_adapters_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune_module, "load_source_model", lambda name, **_: _tiny())  # no GGUF for a tiny model
    data = tmp_path / "domain.txt"
    data.write_text(TEXT)
    config = tmp_path / "run.toml"
    config.write_text(textwrap.dedent("""
        [data]
        tokenizer = "byte"
        [train]
        batch_size = 4
        seq_len = 16
        lr = 0.01
        eval_windows = 4
        eval_interval = 2
        [lora]
        rank = 4
    """))
    out = tmp_path / "out"
    base = ["finetune", "--config", str(config), "--model", "tiny", "--data", str(data), "--out", str(out),
            "--json", "--quiet"]
    assert main(base + ["--steps", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [h["step"] for h in result["history"]] == [0, 2, 4]
    assert result["history"][-1]["eval_loss"] < result["history"][0]["eval_loss"]
    assert result["base"] == "nf4:g64:dq" and result["trainable_fraction"] < 0.2
    assert result["adapters"] == str(out / "adapters-step4") and result["peak_rss_mb"] > 0
    # the saved adapters reproduce the fine-tuned model on a fresh NF4 base
    tuner = FineTuner(FinetuneConfig.from_dict(result["config"]), model=_tiny(), tokens=_tokens())
    fresh = tuner.model()
    restore_adapters(fresh, result["adapters"])
    saved = {name: np.asarray(layer.lora_b[...]) for name, layer in lora_layers(fresh)}
    assert any(np.abs(b).max() > 0 for b in saved.values())
    # a longer run resumes only with --force (steps is a run setting), and continues from step 4
    assert main(base + ["--steps", "6"]) == 2
    assert "train.steps: 4 -> 6" in capsys.readouterr().err
    assert main(base + ["--steps", "6", "--force"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["resumed_from"] == 4 and [h["step"] for h in resumed["history"]] == [0, 2, 4, 6]
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nranks = 4\n")
    assert main(["finetune", "--config", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "lora.ranks" in capsys.readouterr().err
