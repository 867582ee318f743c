"""Training data: corpus tokens (byte-level or SmolLM2 BPE), the train / eval split, batches
drawn deterministically from (seed, step) so that a resumed run sees the same batches.
"""

from __future__ import annotations

import numpy as np

from lowbit.data.corpus import load_text, split_tokens, token_windows
from lowbit.train.config import TOKENIZERS


def encode(text: str, tokenizer: str = "byte") -> np.ndarray:
    """Token ids of text: int32 [n]. 'byte': the UTF-8 bytes; 'smollm2': the SmolLM2 tokenizer."""
    if tokenizer == "byte":
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    if tokenizer == "smollm2":
        from lowbit.models.registry import resolve_model
        from lowbit.models.tokenizer import Tokenizer

        return np.asarray(Tokenizer.from_gguf(resolve_model("smollm2-135m")).encode(text), np.int32)
    raise ValueError(f"tokenizer must be one of {sorted(TOKENIZERS)}, got {tokenizer!r}")


def corpus_tokens(corpus: str = "pydoc", tokenizer: str = "byte",
                  eval_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) token streams: the first 1 - eval_fraction of the corpus and the rest."""
    tokens = encode(load_text(corpus), tokenizer)
    return split_tokens(tokens, 1.0 - eval_fraction)


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """The training batch of `step`: batch_size windows of seq_len tokens at offsets drawn from
    a generator seeded by (seed, step): int32 [batch_size, seq_len]."""
    if tokens.size < seq_len:
        raise ValueError(f"{tokens.size} training tokens available, but one window needs seq_len={seq_len}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len + 1, size=batch_size)
    return tokens[starts[:, None] + np.arange(seq_len)[None, :]].astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, count: int | None = None) -> np.ndarray:
    """Non-overlapping held-out windows from the start of the eval stream: int32 [n, seq_len]."""
    available = tokens.size // seq_len
    if count is not None:
        count = min(count, available)
    return token_windows(tokens, seq_len, count)
