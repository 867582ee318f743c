import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from lowbit.nn import BinaryLinear, BitLinear, QuantLinear
from lowbit.train import TrainConfig, Trainer
from lowbit.cli import build_parser
from lowbit.cli.train import run as run_train

ROOT = Path(__file__).resolve().parents[2]


def _tokens(n_train=4000, n_eval=600, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, n_train).astype(np.int32), rng.integers(0, 256, n_eval).astype(np.int32)


def _config(preset="int4-lsq", **train):
    settings = {"steps": 6, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "eval_interval": 3,
                "eval_windows": 8}
    settings.update(train)
    return TrainConfig.from_dict({"model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
                                  "train": settings, "quant": {"preset": preset}})


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    tokens = _tokens()
    straight = Trainer(_config(), tokens=tokens)
    straight.run()
    config = _config(checkpoint_dir=str(tmp_path / "ckpt"))
    first = Trainer(config, tokens=tokens)
    first.run(until_step=3)
    first.close()
    resumed = Trainer(config, tokens=tokens)  # finds step 3 and restores it
    assert resumed.step == 3 and len(resumed.train_losses) == 3
    resumed.run()
    a, b = _leaves(straight.state()), _leaves(resumed.state())
    assert len(a) == len(b) > 20  # parameters, LSQ steps and the AdamW moments
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert straight.train_losses == resumed.train_losses
    assert [h["eval_loss"] for h in straight.history] == [h["eval_loss"] for h in resumed.history]
    resumed.close()
    other = _config(preset="ternary", checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="quant.preset changed the model's arrays"):
        Trainer(other, tokens=tokens)


def test_loss_decreases_with_every_kind_of_quantized_layer():
    text = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, np.uint8).astype(np.int32)
    rules = [
        {"path": r".*attn\.wq", "layer": "bitlinear"},
        {"path": r".*attn\.wk", "layer": "binary"},
        {"path": r".*attn\.wv", "weight_spec": "int4:channel", "act_spec": "int4", "estimator": "lsq"},
        {"path": r".*attn\.wo", "weight_spec": "int8:channel", "act_spec": "int4", "act_estimator": "pact",
         "act_clip_init": 3.0},
        {"path": r".*mlp\.w_gate", "weight_spec": "int4:g16:clip0.9", "estimator": "clipped"},
        {"path": r".*mlp\.w_up", "weight_spec": "int8:channel", "act_spec": "int8:token"},
        {"path": r".*mlp\.w_down", "weight_spec": "int2:g32", "estimator": "lsq", "lsq_grad_scale": False},
    ]
    config = TrainConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
        "train": {"steps": 12, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup_steps": 1,
                  "eval_interval": 0, "eval_windows": 4},
        "quant": {"rules": rules}})
    trainer = Trainer(config, tokens=(text[:1500], text[1500:]))
    block = trainer.model().layers[0]
    assert type(block.attn.wq) is BitLinear and type(block.attn.wk) is BinaryLinear
    assert all(isinstance(layer, QuantLinear) for layer in (block.attn.wv, block.attn.wo, block.mlp.w_down))
    quantizers = {name: np.asarray(getattr(layer, attr)[...]) for name, layer, attr in (
        ("wv.weight_step", block.attn.wv, "weight_step"), ("wv.act_step", block.attn.wv, "act_param"),
        ("wo.pact_alpha", block.attn.wo, "act_param"), ("w_down.weight_step", block.mlp.w_down, "weight_step"))}
    initial = trainer.evaluate()["eval_loss"]
    trainer.run()
    losses = trainer.train_losses
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    assert trainer.history[-1]["eval_loss"] < initial - 0.5
    block = trainer.model().layers[0]
    for name, before in quantizers.items():
        layer_name, attr = name.split(".")
        layer = getattr(block.attn if layer_name in ("wv", "wo") else block.mlp, layer_name)
        after = np.asarray(getattr(layer, "weight_step" if attr == "weight_step" else "act_param")[...])
        assert not np.array_equal(before, after), f"{name} was not trained"


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, jax
    from flax import nnx
    from lowbit.nn import QuantLinear
    from lowbit.train import TrainConfig, Trainer
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, 4000).astype(np.int32), rng.integers(0, 256, 600).astype(np.int32)
    QUANT = {"fp32": {"preset": "fp32"}, "ternary": {"preset": "ternary"},
             "ternary-weights": {"rules": [{"path": r"layers\\.\\d+\\..*", "weight_spec": "ternary"}]}}
    def codes(trainer):
        out = []
        for _, node in nnx.iter_graph(trainer.model()):
            if isinstance(node, QuantLinear):
                w = np.asarray(node.kernel[...])
                out.append(np.clip(np.round(w / (np.mean(np.abs(w)) + 1e-5)), -1, 1))
        return out
    def run(name, parallel):
        config = TrainConfig.from_dict({"model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
            "train": {"steps": 3, "batch_size": 8, "seq_len": 16, "warmup_steps": 1, "eval_interval": 0,
                      "eval_windows": 16, "data_parallel": parallel}, "quant": QUANT[name]})
        trainer = Trainer(config, tokens=tokens)
        metrics = [trainer.train_step() for _ in range(3)]
        batch = trainer._put(trainer._batch(0))
        leaf = jax.tree.leaves(trainer.params)[0]
        return trainer, metrics, {"batch_devices": len(batch.sharding.device_set),
                                  "batch_shard_rows": batch.addressable_shards[0].data.shape[0],
                                  "param_devices": len(leaf.sharding.device_set),
                                  "param_replicated": leaf.sharding.is_fully_replicated}
    result = {}
    for name in QUANT:
        (single, m1, info1), (sharded, m8, info8) = run(name, 1), run(name, 8)
        diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params))]
        c1, c8 = codes(single), codes(sharded)
        result[name] = {"single": info1, "sharded": info8, "max_param_diff": max(diffs),
                        "losses": [[m["loss"] for m in m1], [m["loss"] for m in m8]],
                        "grad_norms": [[m["grad_norm"] for m in m1], [m["grad_norm"] for m in m8]],
                        "eval": [single.evaluate()["eval_loss"], sharded.evaluate()["eval_loss"]],
                        "code_disagreement": sum(int(np.sum(a != b)) for a, b in zip(c1, c8))
                                             / max(1, sum(a.size for a in c1))}
    print(json.dumps(result))
""")


def test_data_parallel_over_eight_devices_equals_one_device():
    """One device and eight simulated devices (batch split, parameters replicated, gradients
    all-reduced) compute the same training run up to what floating point allows:

    - fp32 and ternary weights with float inputs: only the reduction order differs, so losses
      and gradient norms agree to float32 rounding (relative 1e-5; seen: 4e-7) and parameters to
      1e-6 (seen: 1.2e-7). AdamW turns a gradient's relative error r into an update error of
      about lr * r: three steps at lr <= 1e-3 with r up to 1e-4 (cancelling sums) stay below it.
      Ternary codes are equal (the closest weight sits 3.7e-6 from a rounding threshold, 30x the
      parameter difference).
    - the ternary preset (BitLinear: int8 per-token inputs) is discontinuous in its inputs: an
      input code flips where the two runs' float difference (relative r ~ 1e-6) straddles a
      rounding boundary. With N = 36,864 input codes a step and mean |code| ~ 40, about
      N * r * 40 ~ 1.5 codes flip per step; one flip moves one input by 1/127 of its token's
      absmax, seen as 7e-6 of the loss at step 0 (parameters still identical). Losses are held
      to 1e-4 relative (about 15 flips); AdamW then amplifies the gradient difference of
      near-zero gradients, so parameters move apart by up to ~0.2 lr (seen: 1.3e-4 at lr 1e-3)
      and only a small share of ternary codes may differ (bound 1e-3; seen: none).
    """
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["sharded"] == {"batch_devices": 8, "batch_shard_rows": 1, "param_devices": 8,
                                     "param_replicated": True}, name
        assert result["single"]["batch_devices"] == 1, name
    for name in ("fp32", "ternary-weights"):
        result = results[name]
        np.testing.assert_allclose(*result["losses"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(*result["grad_norms"], rtol=1e-5, err_msg=name)
        assert result["eval"][0] == pytest.approx(result["eval"][1], rel=1e-5), name
        assert result["max_param_diff"] < 1e-6, name
    assert results["ternary-weights"]["code_disagreement"] == 0
    ternary = results["ternary"]
    np.testing.assert_allclose(*ternary["losses"], rtol=1e-4)
    np.testing.assert_allclose(*ternary["grad_norms"], rtol=1e-4)
    assert ternary["eval"][0] == pytest.approx(ternary["eval"][1], rel=1e-4)
    assert ternary["max_param_diff"] < 0.2 * 1e-3 * 3  # three steps at lr <= 1e-3
    assert ternary["code_disagreement"] <= 1e-3


def test_cli_trains_from_a_toml_file_and_prints_json(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus of plain text for a byte-level model. " * 60)
    config = tmp_path / "run.toml"
    config.write_text(textwrap.dedent(f"""
        [model]
        d_model = 32
        n_layers = 1
        n_heads = 2
        [data]
        corpus = "{corpus}"
        [train]
        steps = 4
        batch_size = 4
        seq_len = 16
        eval_interval = 2
        eval_windows = 4
        [quant]
        preset = "int4-lsq"
        """))
    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(config), "--json", "--checkpoint-dir", str(tmp_path / "ck")])
    assert run_train(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["step"] for h in out["history"]] == [2, 4] and out["resumed_from"] == 0
    assert out["layers"]["layers.0.attn.wq"] == 0
    assert (tmp_path / "ck" / "4").is_dir()
    config.write_text(config.read_text().replace("steps = 4", "steps = 6\nlr = 2e-3"))
    resume = ["train", "--config", str(config), "--json", "--checkpoint-dir", str(tmp_path / "ck")]
    with pytest.raises(ValueError, match="train.lr: 0.001 -> 0.002.*--force"):
        run_train(parser.parse_args(resume))
    with pytest.raises(ValueError, match="exclude each other"):
        run_train(parser.parse_args(resume + ["--force", "--no-resume"]))
    capsys.readouterr()
    assert run_train(parser.parse_args(resume + ["--force"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resumed_from"] == 4 and [h["step"] for h in out["history"]] == [2, 4, 6]
    with pytest.raises(SystemExit):  # --config is required
        parser.parse_args(["train"])


def test_resume_names_every_changed_key_and_refuses_run_changes_without_force(tmp_path):
    tokens = _tokens()
    directory = str(tmp_path / "ckpt")
    first = Trainer(_config(checkpoint_dir=directory), tokens=tokens)
    first.run(until_step=3)
    first.close()
    changed = _config(checkpoint_dir=directory, lr=2e-3, batch_size=8, eval_interval=2)
    with pytest.raises(ValueError) as error:
        Trainer(changed, tokens=tokens)
    message = str(error.value)
    assert "train.lr: 0.001 -> 0.002" in message and "train.batch_size: 4 -> 8" in message
    assert "train.eval_interval: 3 -> 2" in message and "--force" in message
    forced = Trainer(changed, tokens=tokens, resume="force")  # continues from step 3 as asked
    assert forced.step == 3 and forced.config.train.lr == 2e-3
    forced.close()
    harmless = Trainer(_config(checkpoint_dir=directory, eval_interval=2, eval_windows=4),
                       tokens=tokens)
    assert harmless.step == 3  # evaluation and checkpoint settings may change freely
    harmless.close()
    for section, change, key in (("data", {"tokenizer": "smollm2"}, "data.tokenizer"),
                                 ("model", {"d_model": 64}, "model.d_model"),
                                 ("quant", {"preset": "ternary"}, "quant.preset")):
        other = _config(checkpoint_dir=directory).replace(**{section: change})
        for resume in (True, "force"):  # arrays of another shape cannot be restored at all
            with pytest.raises(ValueError, match=f"cannot be restored.*{key}: "):
                Trainer(other, tokens=tokens, resume=resume)
    with pytest.raises(ValueError, match="resume must be"):
        Trainer(_config(), tokens=tokens, resume="yes")


def test_a_diverging_run_stops_before_saving_non_finite_weights(tmp_path):
    tokens = _tokens()
    directory = tmp_path / "ckpt"
    trainer = Trainer(_config(checkpoint_dir=str(directory), lr=1e30, checkpoint_interval=1,
                              preset="fp32"), tokens=tokens)
    with pytest.raises(ValueError, match="training diverged: the (loss|parameters)"):
        trainer.run()
    for step in trainer.store.all_steps():
        state, _ = trainer.store.restore(step, trainer.state())
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    trainer.close()
