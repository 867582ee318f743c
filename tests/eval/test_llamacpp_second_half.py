"""`--score second-half` against llama.cpp (llama-cpp-python, the optional `ref` extra): the
second half of each window, as llama-perplexity scores it, on the same windows within 0.5%."""

import math

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

import gguf  # noqa: E402

from lowbit.data.corpus import corpus_tokens, token_windows  # noqa: E402
from lowbit.eval import perplexity  # noqa: E402
from lowbit.models.loader import load_gguf_model  # noqa: E402
from lowbit.models.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.model

CTX = 512
WINDOWS = 4
THREADS = 1  # llama.cpp's logits do not depend on its thread count; one avoids spin stalls


def _second_half_nll_sum(llm, window: np.ndarray) -> float:
    """llama-perplexity's sum for one window: -log p(window[j + 1] | window[:j + 1]) for
    j = ctx//2 .. ctx-2, from llama.cpp's logits."""
    llm.reset()
    llm.eval(window.tolist())
    logits = np.asarray(llm.scores[: window.size], np.float64)
    first = window.size // 2
    rows = logits[first:-1]
    peak = rows.max(axis=-1)
    lse = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=-1))
    picked = rows[np.arange(rows.shape[0]), window[first + 1:]]
    return float(-(picked - lse).sum())


def test_second_half_perplexity_matches_llamacpp(smollm2_path):
    reader = gguf.GGUFReader(str(smollm2_path))
    # llama-perplexity puts BOS first in each window only when the file asks for it; this one
    # does not, so its windows are the text's tokens back to back, as lowbit's are.
    assert not reader.fields["tokenizer.ggml.add_bos_token"].contents()
    tokens, first_token = corpus_tokens(Tokenizer.from_gguf(smollm2_path), "pydoc", "all")
    assert first_token == 0
    model, _ = load_gguf_model(smollm2_path)
    ours = perplexity(model, tokens, ctx=CTX, windows=WINDOWS, score="second-half")
    assert ours.tokens_scored == WINDOWS * (CTX - 1 - CTX // 2)
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=CTX, logits_all=True, n_threads=THREADS,
                          n_threads_batch=THREADS, verbose=False)
    try:
        total = sum(_second_half_nll_sum(llm, w) for w in token_windows(tokens, CTX, WINDOWS))
    finally:
        llm.close()
    theirs = math.exp(total / ours.tokens_scored)
    print(f"second-half perplexity, {WINDOWS} windows of {CTX} from the start of pydoc: "
          f"lowbit {ours.ppl:.4f}, llama.cpp {theirs:.4f}")
    assert 3 < theirs < 30, theirs
    assert abs(ours.ppl / theirs - 1) < 0.005, (ours.ppl, theirs)
