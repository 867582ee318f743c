"""GGUF export of the real SmolLM2-135M: RTN int4 g32 written to Q4_0 without a second rounding, with
the source's tokenizer; and (with llama-cpp-python, the `ref` extra) llama.cpp's perplexity of the
exported Q4_0 file within 0.5% of lowbit's on the same windows, ternary TQ1_0 / TQ2_0 / F32
exports checked as far as they agree, greedy tokens equal on an F32 export, and a ternary model
trained here (int8 inputs per 256, as llama.cpp's TQ matmuls) within 0.5% in TQ1_0 / TQ2_0.
"""

import math
import warnings

import numpy as np
import pytest

import lowbit
from lowbit.data.corpus import load_text, split_tokens, token_windows
from lowbit.eval import perplexity
from lowbit.models.gguf.llama_names import iter_llama_weights
from lowbit.models.gguf.reader import metadata_value, open_gguf
from lowbit.decode import generate
from lowbit.models.loader import load_gguf_model
from lowbit.models.tokenizer import Tokenizer
from lowbit.nn.packed_layer import PackedLayer
from lowbit.ptq.rtn import rtn_quantize

pytestmark = [pytest.mark.model, pytest.mark.slow]

CTX = 512
WINDOWS = 4
NEW_TOKENS = 16
PROMPTS = [
    "def is_prime(n):\n    if n < 2:\n        return",
    "The for statement is used to iterate over the elements of a sequence (such as",
]


def _quantized(smollm2_path, spec):
    model, _ = load_gguf_model(smollm2_path)
    rtn_quantize(model, spec)
    return model


def test_rtn_int4_g32_smollm2_exports_to_q4_0_exactly_with_its_tokenizer(smollm2_path, tmp_path):
    model = _quantized(smollm2_path, "int4:g32")
    report = lowbit.export_gguf(model, tmp_path / "q4_0.gguf", "Q4_0", source=smollm2_path)
    assert len(report["tensors"]) == 272
    assert report["exact_tensors"] == 272 and report["weight_mse"] == 0
    assert report["from_codes_tensors"] == 210
    reader = open_gguf(tmp_path / "q4_0.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert metadata_value(reader, key) == metadata_value(smollm2_path, key)
    for name, weight in iter_llama_weights(reader):
        if name.startswith("layers.") and not name.endswith("norm"):
            _, index, leaf = name.split(".")
            block = model.layers[int(index)]
            layer = getattr(block.attn if leaf in ("wq", "wk", "wv", "wo") else block.mlp, leaf)
            assert isinstance(layer, PackedLayer)
            assert np.array_equal(weight, np.asarray(layer.dequantized_matrix())), name


# ---- llama.cpp -----------------------------------------------------------------------------
def _llama(path, ctx, f32_cache=False):
    llama_cpp = pytest.importorskip("llama_cpp")
    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache \
        else {}
    return llama_cpp.Llama(str(path), n_ctx=ctx, logits_all=True, n_threads=1,
                           n_threads_batch=1, verbose=False, **cache)


def _llamacpp_ppl(llm, windows: np.ndarray) -> float:
    total = 0.0
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        logits = np.asarray(llm.scores[:window.size], np.float64)
        peak = logits.max(axis=-1)
        lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
        total -= float((logits[np.arange(window.size - 1), window[1:]] - lse[:-1]).sum())
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def _llamacpp_argmax(llm, prompt, continuation):
    """llama.cpp's greedy choice after the prompt and each prefix of lowbit's continuation."""
    sequence = list(prompt) + list(continuation)
    llm.reset()
    llm.eval(sequence[:-1])
    return np.argmax(np.array(llm.scores[len(prompt) - 1:len(sequence) - 1]), axis=-1).tolist()


def _lowbit_and_llamacpp_ppl(smollm2_path, model, paths):
    """lowbit's perplexity of `model` and llama.cpp's of each exported file, same windows."""
    tokenizer = Tokenizer.from_gguf(smollm2_path)
    _, evaluation = split_tokens(np.asarray(tokenizer.encode(load_text()), np.int32))
    windows = token_windows(evaluation, CTX, WINDOWS)
    ours = perplexity(model, windows.reshape(-1), ctx=CTX, windows=WINDOWS).ppl
    theirs = []
    for path in paths:
        llm = _llama(path, CTX)
        theirs.append(_llamacpp_ppl(llm, windows))
        llm.close()
    return ours, theirs


def test_llamacpp_runs_the_q4_0_export_with_lowbits_perplexity(smollm2_path, tmp_path):
    pytest.importorskip("llama_cpp")
    model = _quantized(smollm2_path, "int4:g32")
    report = lowbit.export_gguf(model, tmp_path / "m.gguf", "Q4_0", source=smollm2_path)
    assert all(r["exact"] for r in report["tensors"])
    ours, (theirs,) = _lowbit_and_llamacpp_ppl(smollm2_path, model, [tmp_path / "m.gguf"])
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)


def test_llamacpp_runs_ternary_exports(smollm2_path, tmp_path):
    """RTN ternary SmolLM2 (a degenerate model, perplexity about 4.5e7): the F32 export runs in
    llama.cpp within 0.5% of lowbit and the TQ1_0 and TQ2_0 files agree with each other, but on
    them llama.cpp's activation rounding (Q8_K / Q8_0 inputs) moves the perplexity by 0.79%
    (benchmarks/RESULTS.md), so the issue's 0.5% is not met there; 2% is asserted."""
    pytest.importorskip("llama_cpp")
    model = _quantized(smollm2_path, "ternary")
    paths = [tmp_path / f"{t}.gguf" for t in ("F32", "TQ1_0", "TQ2_0")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 576-wide rows fall back to Q4_0 (exactly)
        for path in paths:
            report = lowbit.export_gguf(model, path, path.stem, source=smollm2_path)
            assert all(r["exact"] for r in report["tensors"])
    ours, (f32, tq1, tq2) = _lowbit_and_llamacpp_ppl(smollm2_path, model, paths)
    assert abs(ours / f32 - 1) < 0.005, (ours, f32)
    assert tq1 == pytest.approx(tq2, rel=1e-6)
    assert abs(ours / tq1 - 1) < 0.02, (ours, tq1)


def test_llamacpp_greedy_tokens_match_on_an_f32_export_of_the_quantized_model(smollm2_path,
                                                                               tmp_path):
    pytest.importorskip("llama_cpp")
    model = _quantized(smollm2_path, "int4:g32")
    lowbit.export_gguf(model, tmp_path / "f32.gguf", "F32", source=smollm2_path)
    tokenizer = Tokenizer.from_gguf(smollm2_path)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    assert {len(p) for p in prompts} == {16}
    ours = np.asarray(generate(model, np.asarray(prompts, np.int32), NEW_TOKENS)).tolist()
    llm = _llama(tmp_path / "f32.gguf", 64, f32_cache=True)
    for prompt, row in zip(prompts, ours):
        assert _llamacpp_argmax(llm, prompt, row) == row
    llm.close()


def test_llamacpp_runs_a_trained_ternary_model_with_lowbits_perplexity(smollm2_path, tmp_path):
    """A ternary Llama with TQ-sized rows trained here for a few steps (weights ternary per tensor,
    inputs int8 per 256 = llama.cpp's Q8_K), embedding on the Q8_0 grid: every tensor of its
    TQ1_0 / TQ2_0 files is exact and llama.cpp's perplexity is within 0.5% of lowbit's (the
    20-minute model of papers/bitnet-b158 agrees to 0.011%)."""
    pytest.importorskip("llama_cpp")
    from gguf import GGMLQuantizationType as T

    from lowbit.models.gguf.blocks import dequantize_ggml
    from lowbit.models.gguf.encode import encode_values
    from lowbit.nn import freeze
    from lowbit.train import TrainConfig, Trainer

    config = TrainConfig.from_dict({
        "model": {"d_model": 256, "n_layers": 1, "n_heads": 4, "ffn_dim": 256},
        "data": {"tokenizer": "smollm2"},
        "train": {"steps": 30, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "warmup_steps": 3,
                  "eval_interval": 0, "eval_windows": 1},
        "quant": {"rules": [{"path": r"layers\.\d+\..*", "weight_spec": "ternary",
                             "act_spec": "int8:g256:f32"}]}})
    trainer = Trainer(config)
    trainer.run()
    windows = token_windows(trainer.eval_tokens, 64, 16)
    model = trainer.model()
    freeze(model)
    values = np.asarray(model.embed.embedding[...], np.float32)
    model.embed.embedding.set_value(dequantize_ggml(encode_values(values, T.Q8_0), T.Q8_0,
                                                    values.shape))
    paths = [tmp_path / f"{t}.gguf" for t in ("TQ1_0", "TQ2_0")]
    for path in paths:
        report = lowbit.export_gguf(model, path, path.stem, source=smollm2_path)
        assert all(r["exact"] for r in report["tensors"])
    ours = perplexity(model, windows.reshape(-1), ctx=64, windows=16).ppl
    assert ours < 0.5 * config.data.vocab_size  # trained: well below a uniform guess
    theirs = []
    for path in paths:
        llm = _llama(path, 64)
        theirs.append(_llamacpp_ppl(llm, windows))
        llm.close()
    assert theirs[0] == pytest.approx(theirs[1], rel=1e-6)
    assert abs(ours / theirs[0] - 1) < 0.005, (ours, theirs)
