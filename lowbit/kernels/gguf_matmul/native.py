"""Native CPU GGUF block matmul (GEMV, blocked GEMM, input gradient) and block dequantization through the
XLA FFI: the file's blocks are read as they are."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.kernels.dispatch import NATIVE_GEMM_ROWS
from lowbit.kernels.dispatch import ACTIVATIONS, check_activations
from lowbit.kernels.gguf_matmul.reference import GGUF_BLOCKS


def gguf_matmul_native(x, blocks, ggml_type: str, activations: str = "f32", gemm_rows: int = NATIVE_GEMM_ROWS):
    """x: float32 [M, K]; blocks: uint8 [N, K/32 * block bytes] -> float32 [M, N]: the block GEMV below
    `gemm_rows` rows, the blocked GEMM (f32 activations) from there on. activations "int8": x is
    quantized per row and 32-block inside the kernel (ggml's q8_0) and multiplied in integers (GEMV at
    every row count). Differentiable in x: x-bar = g @ W by `lowbit_gguf_matmul_transposed` over the
    blocks (for "int8", the rounding of x passes the gradient straight through); the blocks are frozen."""
    check_activations(activations, ACTIVATIONS)
    return _product(x.astype(jnp.float32), blocks, GGUF_BLOCKS[ggml_type][0], ACTIVATIONS.index(activations),
                    gemm_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _product(x, blocks, type_id: int, activations_id: int, gemm_rows: int):
    call = jax.ffi.ffi_call("lowbit_gguf_matmul", jax.ShapeDtypeStruct((x.shape[0], blocks.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x, blocks, type=np.int64(type_id), activations=np.int64(activations_id), gemm_rows=np.int64(gemm_rows))


def _product_forward(x, blocks, type_id, activations_id, gemm_rows):
    return _product(x, blocks, type_id, activations_id, gemm_rows), (x.shape, blocks)


def _product_backward(type_id, activations_id, gemm_rows, residuals, g):
    """x-bar = g @ W from the blocks (the blocked GEMM, no float W); the integer blocks get no cotangent."""
    x_shape, blocks = residuals
    call = jax.ffi.ffi_call("lowbit_gguf_matmul_transposed", jax.ShapeDtypeStruct(x_shape, jnp.float32),
                            vmap_method="sequential")
    return call(g.astype(jnp.float32), blocks, type=np.int64(type_id)), None


_product.defvjp(_product_forward, _product_backward)


def gguf_dequantize_native(blocks, ggml_type: str):
    """blocks: uint8 [N, K/32 * block bytes] -> float32 weights [N, K], ggml's formulas, on all cores."""
    n, k = blocks.shape[0], blocks.shape[1] // GGUF_BLOCKS[ggml_type][1] * 32
    call = jax.ffi.ffi_call("lowbit_gguf_dequantize", jax.ShapeDtypeStruct((n, k), jnp.float32),
                            vmap_method="sequential")
    return call(blocks, type=np.int64(GGUF_BLOCKS[ggml_type][0]))
