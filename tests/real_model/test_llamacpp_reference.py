"""lowbit against llama.cpp (llama-cpp-python, the optional `ref` extra) on the real SmolLM2-135M:
identical token ids, perplexity on the same windows within 0.5%, identical greedy tokens (F32 copy),
also from `lowbit generate --kv int8` on a held-apart 514-token prompt.
"""

import json
import math

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import gguf  # noqa: E402

from lowbit.cli import main  # noqa: E402
from lowbit.data.corpus import load_text, split_tokens, token_windows  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.decode import generate  # noqa: E402
from lowbit.models.loader import load_gguf_model  # noqa: E402
from lowbit.models.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.model

CTX = 512
WINDOWS = 4
NEW_TOKENS = 32
# llama.cpp's logits do not depend on its thread count (checked bitwise for 1 and 2); one thread
# keeps its spin barriers from stalling when the cores are shared (2 threads ran 2-3x slower here).
THREADS = 1

TRICKY_STRINGS = [
    "12345678901234567890",
    "3.14159, 1,000,000 and 0x1F; version 2.0.1",
    "12 345 6789",
    "a  b   c    d\t\te\n\n\nf \n g",
    "   leading spaces",
    "trailing spaces   ",
    "\t\t\tx = 1\r\n",
    "héllo wörld, naïve café",
    "日本語のテキストです。中文字符",
    "emoji 😀🎉👍🏽 and a flag 🇯🇵",
    "Ωmega ≠ ∑ ∫ √ and a\u00a0non-breaking space, a\u200bzero-width space",
    "def f(x):\n    return x**2  # square\n",
    "I'm you're we'll they've it's DON'T",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|>text right after a special token<|im_start|>",
    "x" * 300,
    " ",
    "\n",
]

# Four prompts of exactly 16 tokens each, so lowbit generates them as one batch (one compile).
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def is_prime(n):\n    if n < 2:\n        return",
    "Once upon a time, there was a little robot who lived in a quiet village",
    "The for statement is used to iterate over the elements of a sequence (such as",
]


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """llama.cpp on the Q4_1 file itself, keeping the logits of every evaluated position."""
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=CTX, logits_all=True, n_threads=THREADS,
                          n_threads_batch=THREADS, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def f32_reference(smollm2_path, tmp_path_factory):
    """llama.cpp on an F32 copy of the file (every tensor dequantized by the gguf package) with
    an F32 KV cache: the same arithmetic as lowbit's f32 model, without llama.cpp's Q8
    activation rounding and F16 cache."""
    path = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    _write_f32_copy(smollm2_path, path)
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=THREADS,
                          n_threads_batch=THREADS, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    yield llm
    llm.close()
    path.unlink()


@pytest.fixture(scope="module")
def lowbit_model(smollm2_path):
    model, _ = load_gguf_model(smollm2_path)
    return model


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def corpus_text():
    return load_text()


def _write_f32_copy(source, target):
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself.
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _reference_nll_sum(llm, window: np.ndarray) -> float:
    """Sum over positions 1..n-1 of -log p(window[i] | window[:i]) from llama.cpp's logits."""
    llm.reset()
    llm.eval(window.tolist())
    assert llm.n_tokens == window.size
    logits = np.asarray(llm.scores[: window.size], np.float64)
    peak = logits.max(axis=-1)
    lse = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
    picked = logits[np.arange(window.size - 1), window[1:]]
    return float(-(picked - lse[:-1]).sum())


def _reference_next_tokens(llm, prompt: list[int],
                           continuation: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's argmax after the prompt and after each prefix of the continuation
    ([len(continuation)] ids) and the logits they come from, from one pass over the sequence."""
    sequence = list(prompt) + list(continuation)
    llm.reset()
    llm.eval(sequence[:-1])
    logits = np.array(llm.scores[len(prompt) - 1:len(sequence) - 1])
    return np.argmax(logits, axis=-1), logits


def test_tokenizer_matches_llamacpp_on_the_whole_corpus(reference, tokenizer, corpus_text):
    ours = tokenizer.encode(corpus_text)
    assert len(ours) > 100_000
    for special in (True, False):
        theirs = reference.tokenize(corpus_text.encode("utf-8"), add_bos=False, special=special)
        i = _first_difference(ours, theirs)
        assert i is None, (f"special={special}: first difference at token {i}: lowbit "
                           f"{ours[i:i + 8]} vs llama.cpp {theirs[i:i + 8]} near "
                           f"{tokenizer.decode(ours[max(0, i - 8):i + 8])!r}")


def test_tokenizer_matches_llamacpp_on_tricky_strings(reference, tokenizer):
    mismatches = []
    for text in TRICKY_STRINGS:
        ours = tokenizer.encode(text)
        theirs = reference.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ours != theirs:
            mismatches.append((text, ours, theirs))
        decoded = reference.detokenize(ours, special=True).decode("utf-8")
        if tokenizer.decode(ours) != text or decoded != text:
            mismatches.append((text, "round trip", tokenizer.decode(ours), decoded))
    assert not mismatches, mismatches


def test_chat_markup_is_special_tokens_in_both(reference, tokenizer):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids[-1] == tokenizer.token_to_id(
        "<|im_end|>")
    # Without special parsing llama.cpp spells the markup out; lowbit always parses it.
    assert reference.tokenize(text.encode(), add_bos=False, special=False) != ids


def test_perplexity_matches_llamacpp_on_the_same_windows(reference, lowbit_model, tokenizer,
                                                         corpus_text):
    _, evaluation = split_tokens(np.asarray(tokenizer.encode(corpus_text), np.int32))
    windows = token_windows(evaluation, CTX, WINDOWS)
    ours = perplexity(lowbit_model, windows.reshape(-1), ctx=CTX, windows=WINDOWS)
    assert ours.tokens_scored == WINDOWS * (CTX - 1)
    total = sum(_reference_nll_sum(reference, window) for window in windows)
    theirs = math.exp(total / (WINDOWS * (CTX - 1)))
    assert 3 < theirs < 30, theirs
    assert abs(ours.ppl / theirs - 1) < 0.005, (ours.ppl, theirs)


def test_greedy_generation_matches_llamacpp_with_f32_weights(f32_reference, lowbit_model,
                                                             tokenizer):
    # Against the Q4_1 file itself, llama.cpp rounds every matmul input to Q8 and keeps an F16
    # cache (its logits differ from lowbit's f32 ones by about 0.14 on average), so the greedy
    # paths part at near ties within a few tokens; the F32 copy runs lowbit's arithmetic.
    # llama.cpp's greedy choice at each step is the argmax of its logits given the same prefix;
    # all steps are read from one pass over prompt + lowbit's tokens (same result by induction,
    # at a fraction of the cost of 32 single-token F32 passes).
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    assert {len(p) for p in prompts} == {16}, [len(p) for p in prompts]
    ours = generate(lowbit_model, np.asarray(prompts, np.int32), NEW_TOKENS)
    assert ours.shape == (len(PROMPTS), NEW_TOKENS)
    for prompt, row in zip(prompts, ours.tolist()):
        theirs, logits = _reference_next_tokens(f32_reference, prompt, row)
        i = _first_difference(row, theirs.tolist())
        if i is not None:
            top2 = np.sort(logits[i])[-2:]
            pytest.fail(f"greedy step {i} after {tokenizer.decode(prompt)!r} "
                        f"+ {tokenizer.decode(row[:i])!r}: lowbit chose {row[i]}, llama.cpp "
                        f"{theirs[i]} (its top-2 logit margin {top2[1] - top2[0]:.4g})")


@pytest.mark.slow
def test_int8_kv_generate_matches_llamacpp_f32_greedy(smollm2_path, tokenizer, corpus_text, tmp_path, capsys):
    """`lowbit generate --kv int8 --json` (groups of 32, like llama.cpp's q8_0) on the held-apart
    prompt of pydoc tokens 100000..100513 gives llama.cpp's first 24 greedy tokens (F32 copy, F32
    KV cache)."""
    held_apart = tokenizer.encode(corpus_text)[100_000:100_514]
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(tokenizer.decode(held_apart), encoding="utf-8")
    prompt = tokenizer.encode(prompt_file.read_text(encoding="utf-8"))
    assert prompt == held_apart
    main(["generate", "--model", "smollm2-135m", "--kv", "int8", "--activations", "f32", "--json", "--quiet",
          "--prompt-file", str(prompt_file), "--max-new-tokens", "24"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours = info["results"][0]["tokens"]
    assert info["kv"] == "int8" and info["results"][0]["prompt_tokens"] == 514 and len(ours) == 24
    path = tmp_path / "smollm2-f32.gguf"
    _write_f32_copy(smollm2_path, path)
    llm = llama_cpp.Llama(str(path), n_ctx=640, logits_all=True, n_threads=THREADS, n_threads_batch=THREADS,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    try:
        theirs, logits = _reference_next_tokens(llm, prompt, ours)
    finally:
        llm.close()
    print(f"lowbit --kv int8: {ours}\nllama.cpp F32:    {theirs.tolist()}")
    i = _first_difference(ours, theirs.tolist())
    if i is not None:
        top2 = np.sort(logits[i])[-2:]
        pytest.fail(f"greedy step {i}: lowbit --kv int8 chose {ours[i]}, llama.cpp F32 {theirs[i]} "
                    f"(its top-2 logit margin {top2[1] - top2[0]:.4g})")
