"""Native CPU GGUF block matmul (and block dequantization, for prefill) through the XLA FFI: the file's
blocks are read as they are."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.kernels.gguf_matmul.reference import ACTIVATIONS, GGUF_BLOCKS


def gguf_matmul_native(x, blocks, ggml_type: str, activations: str = "f32"):
    """x: float32 [M, K]; blocks: uint8 [N, K/32 * block bytes] -> float32 [M, N]. activations "int8":
    x is quantized per row and 32-block inside the kernel (ggml's q8_0) and multiplied in integers."""
    call = jax.ffi.ffi_call("lowbit_gguf_matmul", jax.ShapeDtypeStruct((x.shape[0], blocks.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), blocks, type=np.int64(GGUF_BLOCKS[ggml_type][0]),
                activations=np.int64(ACTIVATIONS.index(activations)))


def gguf_dequantize_native(blocks, ggml_type: str):
    """blocks: uint8 [N, K/32 * block bytes] -> float32 weights [N, K], ggml's formulas, on all cores."""
    n, k = blocks.shape[0], blocks.shape[1] // GGUF_BLOCKS[ggml_type][1] * 32
    call = jax.ffi.ffi_call("lowbit_gguf_dequantize", jax.ShapeDtypeStruct((n, k), jnp.float32),
                            vmap_method="sequential")
    return call(blocks, type=np.int64(GGUF_BLOCKS[ggml_type][0]))
