"""Load a llama GGUF checkpoint into a lowbit Llama, streaming one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from lowbit.models.gguf.llama_names import iter_llama_weights, llama_config
from lowbit.models.gguf.reader import open_gguf
from lowbit.models.llama import Llama, LlamaConfig


def load_gguf_model(path: str | Path, *, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> tuple[Llama, LlamaConfig]:
    """(model, config) from a llama GGUF file; weights are dequantized to param_dtype.

    The Q/K rows come back in Hugging Face order, so the model uses rope_layout="half".
    """
    reader = open_gguf(path)
    config = LlamaConfig.from_dict({**llama_config(reader), "rope_layout": "half"})
    model = Llama.from_weights(config, iter_llama_weights(reader), dtype=dtype,
                               param_dtype=param_dtype)
    return model, config
