"""Model-generated calibration windows (LLM-QAT's data-free generation): token sequences the model
samples from itself at temperature 1, each from one start token, with a fixed seed."""

from __future__ import annotations

import jax
import numpy as np

from lowbit.decode.engine import BatchedGenerator, Request

TEMPERATURE = 1.0


def generated_windows(model, samples: int, length: int, *, start_id: int, seed: int = 0,
                      slots: int = 16, progress: bool = False) -> np.ndarray:
    """[samples, length] int32: row i is start_id followed by length - 1 tokens sampled from the
    model at temperature 1 (the whole softmax, no top-k) with key fold_in(key(seed), i), as
    lowbit.decode.generate samples row i of a batch; an end-of-text token does not stop a row (the
    model continues as after a document boundary). Rows decode `slots` at a time from one paged
    KV cache (lowbit.decode.BatchedGenerator); the tokens do not depend on `slots`."""
    for name, value in (("samples", samples), ("length", length), ("slots", slots)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generated calibration {name} must be a positive integer, got {value!r}")
    if length < 2:
        raise ValueError(f"generated calibration length must be at least 2 tokens, got {length}")
    vocab = model.config.vocab_size
    if start_id is None or isinstance(start_id, bool) or not 0 <= int(start_id) < vocab:
        raise ValueError(f"generated calibration needs a start token id in [0, {vocab}), got "
                         f"{start_id!r}")
    key = jax.random.key(seed)
    requests = [Request([int(start_id)], length - 1, TEMPERATURE, jax.random.fold_in(key, i))
                for i in range(samples)]
    generator = BatchedGenerator(model, "f32", slots=min(slots, samples), max_len=length)
    completions = generator.generate(requests, progress=progress)
    return np.asarray([[int(start_id), *c.tokens] for c in completions], np.int32)
