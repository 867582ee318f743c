"""`lowbit eval`: a file is scored from its first token, the corpus split only when asked, and
the JSON names what was scored (text, split, first token, windows, convention)."""

import json

import numpy as np
import pytest
from flax import nnx

import lowbit.checkpoint
from lowbit.cli import main
from lowbit.eval import perplexity
from lowbit.models.llama import Llama, LlamaConfig


class BytesAsIds:
    def encode(self, text):
        return [b % 128 for b in text.encode()]


@pytest.fixture
def tiny(monkeypatch):
    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    monkeypatch.setattr(lowbit.checkpoint, "load_model_and_tokenizer", lambda *args, **kwargs: (model, BytesAsIds()))
    return model


def _eval(capsys, *argv):
    assert main(["eval", "--json", "--quiet", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_file_is_scored_from_its_start(tmp_path, capsys, tiny):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    stream = np.asarray(BytesAsIds().encode(path.read_text()), np.int32)
    info = _eval(capsys, "--text", str(path), "--ctx", "32")
    assert (info["split"], info["first_token"], info["score"]) == ("all", 0, "all")
    assert info["windows"] == stream.size // 32 and info["tokens"] == info["windows"] * 31
    assert info["ppl"] == pytest.approx(perplexity(tiny, stream, ctx=32).ppl, rel=1e-6)

    half = _eval(capsys, "--text", str(path), "--ctx", "32", "--split", "evaluation")
    assert half["split"] == "evaluation" and half["first_token"] == stream.size // 2
    assert half["ppl"] == pytest.approx(perplexity(tiny, stream[stream.size // 2:], ctx=32).ppl,
                                        rel=1e-6)

    second = _eval(capsys, "--text", str(path), "--ctx", "32", "--score", "second-half")
    assert second["score"] == "second-half" and second["tokens"] == info["windows"] * 15
    expected = perplexity(tiny, stream, ctx=32, score="second-half").ppl
    assert second["ppl"] == pytest.approx(expected, rel=1e-6)


def test_the_embedded_corpus_keeps_its_evaluation_half(capsys, tiny):
    info = _eval(capsys, "--ctx", "32", "--windows", "1")
    assert info["split"] == "evaluation" and info["first_token"] > 100_000
    assert info["text"] == "pydoc"


@pytest.mark.model
def test_real_model_default_perplexity_is_unchanged(capsys):
    """SmolLM2-135M on 2 windows of 512 of the pydoc evaluation half, every position after the
    first: the value `lowbit eval --windows 2` printed before the scorers became one."""
    info = _eval(capsys, "--model", "smollm2-135m", "--windows", "2")
    assert (info["split"], info["score"], info["tokens"]) == ("evaluation", "all", 2 * 511)
    assert info["ppl"] == pytest.approx(8.919801999733304, rel=1e-6)


def test_bits_per_weight_counts_the_saved_quantized_linears(tmp_path, capsys, tiny):
    from lowbit.cli.eval import linear_bits_per_weight
    from lowbit.ptq.rtn import rtn_quantize

    model = Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(1))
    result = rtn_quantize(model, "int3:g16:asym")
    lowbit.checkpoint.save(model, tmp_path / "q")
    assert linear_bits_per_weight(tmp_path / "q") == pytest.approx(3 + 32 / 16)
    assert linear_bits_per_weight(tmp_path / "q") == pytest.approx(result.bits_per_weight)
    info = _eval(capsys, "--model", str(tmp_path / "q"), "--ctx", "32", "--windows", "1")
    assert info["bits_per_weight"] == pytest.approx(5.0) and "ppl" in info
    assert linear_bits_per_weight(tmp_path / "missing.gguf") is None
