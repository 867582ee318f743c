"""KV caches on the real SmolLM2-135M: the one-pass cache emulation equals token-by-token decoding,
and int8-cache greedy continuations follow the f32 cache's."""

import numpy as np
import pytest

from lowbit.data.corpus import load_text
from lowbit.decode.engine import BatchedGenerator, Request
from lowbit.decode.quality import final_hidden, teacher_forced_decode_logits
from lowbit.models.loader import load_gguf_model
from lowbit.models.tokenizer import Tokenizer

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_gguf_model(smollm2_path)[0]


@pytest.fixture(scope="module")
def text_tokens(smollm2_path):
    return np.asarray(Tokenizer.from_gguf(smollm2_path).encode(load_text()[:8000]), np.int32)


def test_emulated_int8_cache_matches_decoding_on_the_real_model(smollm2, text_tokens):
    """Across 30 blocks an ulp at a rounding boundary flips a code now and then, so the two runs
    are compared like two draws of the quantization noise: same perplexity, same argmax."""
    rows = text_tokens[None, :48]
    decoded = teacher_forced_decode_logits(smollm2, rows, "int8")[0, :-1]
    emulated = np.asarray(smollm2.head(final_hidden(smollm2, rows, "int8")))[0, :-1]

    def nll(logits):
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -logp[np.arange(len(logp)), rows[0, 1:]].mean()

    assert abs(nll(decoded) - nll(emulated)) < 0.01
    assert (decoded.argmax(-1) == emulated.argmax(-1)).mean() > 0.9


def test_int8_cache_greedy_continuations_follow_the_float_cache(smollm2, text_tokens):
    requests = [Request(text_tokens[s:s + n].tolist(), 12) for s, n in ((0, 40), (300, 25), (900, 33))]
    outputs = {layout: [c.tokens for c in BatchedGenerator(smollm2, layout, slots=3, max_len=64).generate(requests)]
               for layout in ("f32", "int8")}
    agree = [a == b for a, b in zip(outputs["f32"], outputs["int8"])]
    assert sum(agree) >= 2, outputs
