"""Layers that compute from GGUF Q4_0 / Q4_1 / Q8_0 blocks through gguf_matmul (a linear layer, and a
token embedding that is also a tied output head), and `quantize_embeddings`, which puts any NNX model's
nnx.Embed tables into Q8_0 blocks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.kernels.gguf_matmul import GGUF_BLOCKS, dequantize_blocks, gguf_matmul
from lowbit.kernels.gguf_matmul.reference import ACTIVATIONS, check_blocks
from lowbit.nn.packed_layer import PackedWeight, register_layer
from lowbit.nn.packed_linear import module_at, set_child

# The block types quantize_embeddings writes (the tied head then reads 34 bytes per 32 weights).
EMBED_TYPES = ("Q8_0",)
_ENCODE_ROWS = 4096  # table rows encoded at a time (bounds the temporaries, not the result)


def _check_type(ggml_type: str) -> str:
    if ggml_type not in GGUF_BLOCKS:
        raise ValueError(f"ggml_type must be one of {sorted(GGUF_BLOCKS)}, got {ggml_type!r}")
    return ggml_type


def _check_activations(activations: str) -> str:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    return activations


def q8_0_blocks(table) -> np.ndarray:
    """float table [rows, K] (K a multiple of 32) -> its Q8_0 blocks, uint8 [rows, K/32 * 34].

    Per block of 32 weights: d = float16(max|x| / 127), codes q = clip(round(x / d), -127, 127)
    computed against the stored d (0 where d is 0), as lowbit.models.gguf.encode writes Q8_0; so
    each weight moves by at most d / 2 + 127 |max|x| / 127 - d| (the second term: d rounded down).
    """
    values = np.asarray(table, np.float32)
    if values.ndim != 2 or values.shape[1] % 32 or values.shape[1] == 0:
        raise ValueError(f"table must be [rows, K] with K a positive multiple of 32 (Q8_0 blocks), "
                         f"got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("table must be finite (no NaN or inf) to be stored in Q8_0 blocks")
    rows, k = values.shape
    out = np.empty((rows, k // 32 * GGUF_BLOCKS["Q8_0"][1]), np.uint8)
    for start in range(0, rows, _ENCODE_ROWS):
        blocks = values[start:start + _ENCODE_ROWS].reshape(-1, 32)
        scale = (np.abs(blocks).max(axis=1) / 127).astype("<f2")
        stored = scale.astype(np.float32)
        inverse = np.divide(np.float32(1), stored, out=np.zeros_like(stored), where=stored != 0)
        codes = np.clip(np.round(blocks * inverse[:, None]), -127, 127).astype(np.int8)
        packed = np.concatenate([scale.reshape(-1, 1).view(np.uint8), codes.view(np.uint8)], axis=1)
        out[start:start + _ENCODE_ROWS] = packed.reshape(-1, out.shape[1])
    return out


class GgufLinear(nnx.Module):
    """y = x @ W.T for W [out, in] held as its GGUF blocks (uint8 [out, in/32 * block bytes], one
    output feature per row, exactly the file's bytes): the nnx.Linear it replaces, without a bias.
    impl, activations: gguf_matmul's ("auto": the native CPU kernel for decode, XLA's dot for
    prefill; "f32" activations, or "int8" rounded per 32-block as ggml does)."""

    def __init__(self, blocks, ggml_type: str, *, impl: str = "auto", activations: str = "f32"):
        self.ggml_type = _check_type(ggml_type)
        self.out_features, self.in_features = check_blocks(blocks, ggml_type)
        self.blocks = PackedWeight(blocks)
        self.impl, self.activations = impl, _check_activations(activations)

    def dequantized_matrix(self) -> jax.Array:
        """The [in, out] f32 matrix this layer multiplies by (the nnx.Linear kernel layout)."""
        return dequantize_blocks(self.blocks[...], self.ggml_type).T

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        return gguf_matmul(x, self.blocks[...], self.ggml_type, impl=self.impl, activations=self.activations)


@register_layer
class GgufEmbed(nnx.Module):
    """A token embedding [vocab, d] held as GGUF blocks (uint8 [vocab, d/32 * block bytes]), in place
    of an nnx.Embed: a lookup dequantizes only the rows it gathers; `attend(h)` = h @ table.T, the tied
    output head, through gguf_matmul (the native GEMV on CPU). Saved by lowbit.checkpoint as its blocks."""

    def __init__(self, blocks, ggml_type: str, *, dtype: Any = jnp.float32, impl: str = "auto",
                 activations: str = "f32"):
        self.ggml_type = _check_type(ggml_type)
        self.num_embeddings, self.features = check_blocks(blocks, ggml_type)
        self.blocks = PackedWeight(blocks)
        self.dtype, self.impl, self.activations = jnp.dtype(dtype), impl, _check_activations(activations)

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (the whole table: scales and codes)."""
        return int(np.prod(self.blocks.get_value().shape))

    def dequantized_table(self) -> jax.Array:
        """The [vocab, d] f32 table the layer looks up and multiplies by."""
        return dequantize_blocks(self.blocks[...], self.ggml_type)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [...] int -> [..., d] in the layer's dtype."""
        rows = jnp.take(self.blocks[...], tokens.reshape(-1), axis=0)
        table = dequantize_blocks(rows, self.ggml_type)
        return table.reshape(*tokens.shape, self.features).astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """h: [..., d] -> [..., vocab] f32 logits against every embedding row."""
        return gguf_matmul(h.astype(jnp.float32), self.blocks[...], self.ggml_type, impl=self.impl,
                           activations=self.activations)

    # ---- checkpoint form (lowbit.nn.packed_layer.register_layer) ----------------------------
    def layer_state(self) -> tuple[dict, dict]:
        meta = {"class": type(self).__name__, "ggml_type": self.ggml_type, "dtype": self.dtype.name,
                "impl": self.impl, "activations": self.activations}
        return meta, {"blocks": self.blocks.get_value()}

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> GgufEmbed:
        return cls(jnp.asarray(arrays["blocks"]), meta["ggml_type"], dtype=jnp.dtype(meta["dtype"]),
                   impl=meta["impl"], activations=meta["activations"])


def _embeddings(model: nnx.Module) -> list[tuple[tuple, nnx.Embed]]:
    return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Embed)]


def quantize_embeddings(model: nnx.Module, ggml_type: str = "Q8_0", *, impl: str = "auto",
                        activations: str = "f32") -> dict[str, int]:
    """Replaces every nnx.Embed of `model` (any Flax NNX model) in place by a GgufEmbed of its table
    in `ggml_type` blocks (EMBED_TYPES: "Q8_0"), so a tied head that calls `embed.attend(h)` (Llama's,
    or nnx.Embed's own API) multiplies by the blocks. One table is encoded at a time and its float
    Param is dropped as its layer goes in. Returns {dotted path: bytes of its blocks}.

    ggml_type not in EMBED_TYPES, a model without an nnx.Embed, or a table width that is not a
    multiple of 32 is a ValueError (the model is then unchanged). A model that reads
    `embed.embedding` directly, not through the layer, needs the float table and cannot use this.
    """
    if ggml_type not in EMBED_TYPES:
        raise ValueError(f"ggml_type must be one of {EMBED_TYPES}, got {ggml_type!r}")
    _check_activations(activations)
    if not isinstance(model, nnx.Module) or isinstance(model, nnx.Embed):
        raise ValueError(f"model must be a Flax NNX model holding nnx.Embed layers, got {type(model).__name__}")
    found = _embeddings(model)
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no nnx.Embed to quantize")
    for path, embed in found:
        features = embed.embedding.get_value().shape[-1]
        if features % 32:
            raise ValueError(f"{'.'.join(map(str, path))}: embedding width {features} is not a multiple "
                             f"of 32, the {ggml_type} block size")
    sizes = {}
    for path, embed in found:
        dtype = embed.dtype or embed.param_dtype
        blocks = jnp.asarray(q8_0_blocks(embed.embedding.get_value()))
        layer = GgufEmbed(blocks, ggml_type, dtype=dtype, impl=impl, activations=activations)
        set_child(module_at(model, path[:-1]), path[-1], layer)
        sizes[".".join(map(str, path))] = layer.nbytes
        del blocks, embed
    return sizes
