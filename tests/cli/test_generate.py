"""`lowbit generate --json` reports compilation, prefill and decode rates separately, on both the
model's own cache and the KV-cache generator, and the activations and cache it chose."""

import json

import jax
import pytest
from flax import nnx

import lowbit.checkpoint
from lowbit.cli import main
from lowbit.kernels.native import native_available
from lowbit.models.llama import Llama, LlamaConfig


class BytesAsIds:
    eos_id = None

    def encode(self, text):
        return [b % 128 for b in text.encode()]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture
def tiny(monkeypatch):
    model = Llama(LlamaConfig.tiny(ffn_dim=96), rngs=nnx.Rngs(0))  # a shape no other test compiles
    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", lambda *args, **kwargs: (model, BytesAsIds()))
    monkeypatch.setenv("LOWBIT_COMPILE_CACHE", "off")  # leave this process's JAX config alone
    return model


def test_generate_json_reports_compile_prefill_and_decode(tiny, capsys):
    assert main(["generate", "--prompt", "a prompt of twenty-one", "--max-new-tokens", "5",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompt_tokens"] == 22 and info["prompt_bucket"] == 32 and len(info["tokens"]) == 5
    assert info["compile_s"] > 0 and info["prefill_tok_s"] > 0 and info["decode_tok_s"] > 0
    assert 0 < info["first_token_s"] <= info["seconds"]


def test_generate_kv_json_reports_the_same_rates(tiny, capsys):
    assert main(["generate", "--prompt", "another prompt", "--max-new-tokens", "4", "--kv", "int8",
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["compile_s"] > 0 and stats["prefill_tok_s"] > 0 and stats["decode_tok_s"] > 0
    assert 0 < stats["first_token_s"] <= stats["seconds"]


def test_generate_speculative_json_matches_plain_greedy(tiny, capsys, tmp_path):
    args = ["generate", "--prompt", "speculate on this", "--max-new-tokens", "12", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--draft", "layers:1", "--gamma", "3"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["results"][0]["tokens"] == plain["tokens"]  # greedy speculation is exact
    assert info["tokens"] == 12 and info["gamma"] == 3 and info["draft"] == "layers:1"
    assert 0 <= info["acceptance_rate"] <= 1 and 1 <= info["target_calls"] <= 11
    assert info["tokens_per_target_call"] == pytest.approx((info["accepted"] + info["target_calls"])
                                                          / info["target_calls"], abs=1e-3)
    assert info["seconds"] > 0
    batch = tmp_path / "prompts.txt"
    batch.write_text("one prompt\nanother prompt here\n")
    assert main(["generate", "--batch-file", str(batch), "--max-new-tokens", "6", "--draft", "layers:1",
                 "--gamma", "2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [len(r["tokens"]) for r in info["results"]] == [6, 6] and info["tokens"] == 12
    assert main(args + ["--draft", "rtn:int4:g32", "--draft-activations", "int8", "--gamma", "4",
                        "--gamma-adaptive", "0.3"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["results"][0]["tokens"] == plain["tokens"] and info["gamma_adaptive"] == 0.3
    assert info["drafted"] <= 4 * info["target_calls"]
    assert main(args + ["--draft", "rtn:q8_0", "--draft-embed", "q8_0", "--gamma", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["tokens"] == plain["tokens"]


@pytest.mark.parametrize("extra,message", [(["--gamma", "0"], "--gamma"), (["--draft", "layers:x"], "layers:N"),
                                           (["--draft", "layers:1", "--kv-policy", "h2o:0.5"], "full KV policy"),
                                           (["--draft", "layers:2"], "n_layers"),
                                           (["--draft", "rtn:int9:gx"], "rtn:SPEC"),
                                           (["--draft", "rtn:q5_k"], "GGUF block"),
                                           (["--draft", "layers:1", "--gamma-adaptive", "1.5"], "--gamma-adaptive"),
                                           (["--draft", "layers:1", "--draft-activations", "int8"],
                                            "--draft-activations")])
def test_generate_speculative_bad_options(tiny, capsys, extra, message):
    assert main(["generate", "--prompt", "x", "--max-new-tokens", "3"] + extra) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def tiny_packed(monkeypatch):
    from lowbit.nn import QuantRule, freeze, quantize_model

    model = Llama(LlamaConfig.tiny(ffn_dim=96), rngs=nnx.Rngs(1))
    quantize_model(model, QuantRule(path=r".*layers.*", weight_spec="int4:g32"), warn=False)
    freeze(model)  # packed int4 layers, as a PTQ checkpoint loads

    def load(name, runtime="packed", activations="f32"):
        from lowbit.nn import set_activations
        set_activations(model, activations)
        return model, BytesAsIds()

    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", load)
    monkeypatch.setenv("LOWBIT_COMPILE_CACHE", "off")
    return model


@pytest.mark.skipif(jax.default_backend() != "cpu" or not native_available(),
                    reason="the auto default takes int8 only on the native CPU kernels")
def test_generate_defaults_to_int8_decode_products_and_f16_cache_on_packed_cpu_models(tiny_packed, capsys):
    args = ["generate", "--prompt", "numerics of llama.cpp", "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    auto = json.loads(capsys.readouterr().out)
    assert (auto["activations"], auto["cache"]) == ("auto", "f16")
    assert {layer.activations for layer in _packed_layers(tiny_packed)} == {"auto"}
    assert main(args + ["--activations", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert (int8["activations"], int8["cache"]) == ("int8", "f16")
    assert main(args + ["--activations", "f32"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert (exact["activations"], exact["cache"]) == ("f32", "f32")


def _packed_layers(model):
    from lowbit.nn.packed_layer import PackedLayer
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, PackedLayer)]


def test_generate_auto_keeps_a_float_model_on_f32(tiny, capsys):
    assert main(["generate", "--prompt", "float", "--max-new-tokens", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["activations"], info["cache"]) == ("f32", "f32")
