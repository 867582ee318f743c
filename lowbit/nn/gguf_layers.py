"""Layers that compute from GGUF Q4_0 / Q4_1 / Q8_0 blocks through gguf_matmul: a linear layer, and a
token embedding that is also a tied output head (lowbit.ptq.quantize_embeddings makes them for any
NNX model); set_activations switches these and the packed layers to int8 activations.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.kernels.gguf_matmul import GGUF_BLOCKS, dequantize_blocks, gguf_matmul
from lowbit.kernels.dispatch import check_activations
from lowbit.kernels.gguf_matmul.reference import check_blocks
from lowbit.kernels.packed_matmul.native import int8_supports
from lowbit.kernels.packed_matmul.reference import weight_format
from lowbit.nn.packed_layer import PackedLayer, PackedWeight, register_layer

def _check_type(ggml_type: str) -> str:
    if ggml_type not in GGUF_BLOCKS:
        raise ValueError(f"ggml_type must be one of {sorted(GGUF_BLOCKS)}, got {ggml_type!r}")
    return ggml_type


class GgufLinear(nnx.Module):
    """y = x @ W.T for W [out, in] held as its GGUF blocks (uint8 [out, in/32 * block bytes], one
    output feature per row, exactly the file's bytes): the nnx.Linear it replaces, without a bias.
    impl, activations: gguf_matmul's ("auto": the native CPU kernel for decode, XLA's dot for
    prefill; "f32" activations, "int8" rounded per 32-block as ggml does, or "auto": int8 in the
    native decode GEMV only)."""

    def __init__(self, blocks, ggml_type: str, *, impl: str = "auto", activations: str = "f32"):
        self.ggml_type = _check_type(ggml_type)
        self.out_features, self.in_features = check_blocks(blocks, ggml_type)
        self.blocks = PackedWeight(blocks)
        self.impl, self.activations = impl, check_activations(activations)

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
        self.dtype, self.impl, self.activations = jnp.dtype(dtype), impl, check_activations(activations)

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


def set_activations(model: nnx.Module, activations: str) -> int:
    """Sets how every packed and GGUF layer of `model` meets its input: "int8" (each row rounded per
    block to int8 as ggml does, integer dots: faster decode GEMVs, a small rounding of x), "f32"
    (the default: the float product) or "auto" (int8 in the native decode GEMVs, f32 in prefill
    GEMMs and off the native backend: lowbit.kernels.dispatch.choose_activations). Packed layers
    whose codes are not integers (nf4/fp4) or that run dequantized keep "f32". Returns how many
    layers now run with `activations`; a runtime setting, not saved in checkpoints."""
    check_activations(activations)
    count = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, (GgufLinear, GgufEmbed)):
            module.activations = activations
            count += 1
        elif isinstance(module, PackedLayer) and module.uses_kernel:
            takes_int8 = int8_supports(weight_format(module.packed.expand_scales())) is None
            if activations == "f32" or takes_int8:
                module.activations = activations
                count += 1
    return count
