"""Token embeddings in GGUF blocks for any Flax NNX model: every nnx.Embed table becomes a
lowbit.nn.GgufEmbed (the tied head then reads 34 bytes per 32 weights), encoded by the same
encoder as GGUF export, one table at a time.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.kernels.dispatch import check_activations
from lowbit.models.gguf.encode import encode_values
from lowbit.nn.gguf_layers import GgufEmbed
from lowbit.nn.packed_linear import module_at, set_child

EMBED_TYPES = ("Q8_0",)  # the block types quantize_embeddings writes
_ENCODE_ROWS = 4096  # table rows encoded at a time (bounds the encoder's temporaries, not the result)


def _encoded_table(table, ggml_type: str) -> np.ndarray:
    """uint8 [rows, K / 32 * block bytes]: the table's blocks, encoded _ENCODE_ROWS rows at a time."""
    values = np.asarray(table, np.float32)
    parts = [encode_values(values[start:start + _ENCODE_ROWS], ggml_type)
             for start in range(0, values.shape[0], _ENCODE_ROWS)]
    return np.concatenate(parts, axis=0)


def quantize_embeddings(model: nnx.Module, ggml_type: str = "Q8_0", *, impl: str = "auto",
                        activations: str = "f32") -> dict[str, int]:
    """Replaces every nnx.Embed of `model` (any Flax NNX model) in place by a GgufEmbed of its table
    in `ggml_type` blocks (EMBED_TYPES: "Q8_0"), so a tied head that calls `embed.attend(h)` (Llama's,
    or nnx.Embed's own API) multiplies by the blocks. One table is encoded at a time and its float
    Param is dropped as its layer goes in. Returns {dotted path: bytes of its blocks}.

    ggml_type not in EMBED_TYPES, a model without an nnx.Embed, a table width that is not a
    multiple of 32 or a table that is not finite is a ValueError (the model is then unchanged). A
    model that reads `embed.embedding` directly, not through the layer, needs the float table and
    cannot use this.
    """
    if ggml_type not in EMBED_TYPES:
        raise ValueError(f"ggml_type must be one of {EMBED_TYPES}, got {ggml_type!r}")
    check_activations(activations)
    if not isinstance(model, nnx.Module) or isinstance(model, nnx.Embed):
        raise ValueError(f"model must be a Flax NNX model holding nnx.Embed layers, got {type(model).__name__}")
    found = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Embed)]
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no nnx.Embed to quantize")
    for path, embed in found:
        table = embed.embedding.get_value()
        where = ".".join(map(str, path))
        if table.shape[-1] % 32:
            raise ValueError(f"{where}: embedding width {table.shape[-1]} is not a multiple of 32, the "
                             f"{ggml_type} block size")
        if not bool(jnp.all(jnp.isfinite(table))):
            raise ValueError(f"{where}: the embedding table must be finite (no NaN or inf)")
    sizes = {}
    for path, embed in found:
        dtype = embed.dtype or embed.param_dtype
        blocks = jnp.asarray(_encoded_table(embed.embedding.get_value(), ggml_type))
        layer = GgufEmbed(blocks, ggml_type, dtype=dtype, impl=impl, activations=activations)
        set_child(module_at(model, path[:-1]), path[-1], layer)
        sizes[".".join(map(str, path))] = layer.nbytes
        del blocks, embed
    return sizes
