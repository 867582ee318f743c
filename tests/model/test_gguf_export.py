"""GGUF export of the real SmolLM2-135M: RTN int4 g32 written to Q4_0 without a second rounding, with
the source's tokenizer; and (with llama-cpp-python, the `ref` extra) llama.cpp's perplexity of the
exported Q4_0 and ternary TQ1_0 / TQ2_0 files within 0.5% of lowbit's on the same windows, and
greedy tokens equal on an F32 export of the same quantized model.
"""

import math
import warnings

import numpy as np
import pytest

import lowbit
from lowbit.data.corpus import load_text, split_tokens, token_windows
from lowbit.eval import perplexity
from lowbit.gguf.llama_names import iter_llama_weights
from lowbit.gguf.reader import metadata_value, open_gguf
from lowbit.models.llama import generate
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


@pytest.mark.parametrize("spec, gguf_type", [("int4:g32", "Q4_0"), ("ternary", "TQ1_0"),
                                             ("ternary", "TQ2_0")])
def test_llamacpp_runs_the_export_with_lowbits_perplexity(smollm2_path, tmp_path, spec,
                                                          gguf_type):
    pytest.importorskip("llama_cpp")
    model = _quantized(smollm2_path, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ternary: 576-wide rows fall back to Q4_0 (exactly)
        report = lowbit.export_gguf(model, tmp_path / "m.gguf", gguf_type, source=smollm2_path)
    assert all(r["exact"] for r in report["tensors"])
    tokenizer = Tokenizer.from_gguf(smollm2_path)
    _, evaluation = split_tokens(np.asarray(tokenizer.encode(load_text()), np.int32))
    windows = token_windows(evaluation, CTX, WINDOWS)
    ours = perplexity(model, windows.reshape(-1), ctx=CTX, windows=WINDOWS).ppl
    llm = _llama(tmp_path / "m.gguf", CTX)
    theirs = _llamacpp_ppl(llm, windows)
    llm.close()
    assert abs(ours / theirs - 1) < 0.005, (ours, theirs)


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
