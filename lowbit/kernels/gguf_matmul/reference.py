"""Pure-jnp GGUF block matmul: dequantize the raw Q4_0 / Q4_1 / Q8_0 blocks of each row, then contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ggml type name -> (type id of the native kernel, bytes per block of 32 weights)
GGUF_BLOCKS = {"Q4_0": (0, 18), "Q4_1": (1, 20), "Q8_0": (2, 34)}
# How activations meet the blocks: "f32" as they are; "int8" rounded per row and 32-block to
# round(x / d) * d with d = max|x| / 127 (ggml's q8_0), the integer dot products of ggml's CPU kernels.


def check_blocks(blocks, ggml_type: str, k: int | None = None) -> tuple[int, int]:
    """Validate raw blocks [N, K/32 * block bytes] of `ggml_type`; returns (N, K)."""
    if ggml_type not in GGUF_BLOCKS:
        raise ValueError(f"ggml_type must be one of {sorted(GGUF_BLOCKS)}, got {ggml_type!r}")
    block_bytes = GGUF_BLOCKS[ggml_type][1]
    if not hasattr(blocks, "dtype") or blocks.dtype != jnp.uint8 or blocks.ndim != 2:
        raise ValueError(f"blocks must be a uint8 array [N, K/32 * {block_bytes}] (one weight row per "
                         f"output), got {getattr(blocks, 'dtype', type(blocks).__name__)} "
                         f"{tuple(getattr(blocks, 'shape', ()))}")
    if blocks.shape[1] % block_bytes:
        raise ValueError(f"blocks: a {ggml_type} row holds whole {block_bytes}-byte blocks, "
                         f"got rows of {blocks.shape[1]} bytes")
    n, row_k = blocks.shape[0], blocks.shape[1] // block_bytes * 32
    if k is not None and k != row_k:
        raise ValueError(f"x must have shape [..., K] with K={row_k} (the blocks hold {row_k} weights per row), "
                         f"got K={k}")
    return n, row_k


def _half(pair):
    """uint8 [..., 2] little-endian -> float32 [...]."""
    return jax.lax.bitcast_convert_type(pair, jnp.float16).astype(jnp.float32)


def dequantize_blocks(blocks, ggml_type: str):
    """Raw blocks [N, K/32 * block bytes] -> float32 weights [N, K] (ggml's own formulas)."""
    n, k = check_blocks(blocks, ggml_type)
    b = blocks.reshape(n, k // 32, GGUF_BLOCKS[ggml_type][1])
    d = _half(b[..., 0:2])[..., None]
    if ggml_type == "Q8_0":
        q = jax.lax.bitcast_convert_type(b[..., 2:34], jnp.int8).astype(jnp.float32)
        w = q * d
    else:
        nibbles = b[..., 4:20] if ggml_type == "Q4_1" else b[..., 2:18]
        q = jnp.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(jnp.float32)  # j, j + 16
        w = (q - 8.0) * d if ggml_type == "Q4_0" else q * d + _half(b[..., 2:4])[..., None]
    return w.reshape(n, k)


def quantize_activation_blocks(x):
    """x: [M, K] -> the int8-rounded activations [M, K] f32 (activations "int8": per row and 32-block)."""
    m, k = x.shape
    blocks = x.astype(jnp.float32).reshape(m, k // 32, 32)
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 127.0
    inverse = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    q = jnp.clip(jnp.round(blocks * inverse), -127, 127)
    return (q * d).reshape(m, k)


def gguf_matmul_reference(x, blocks, ggml_type: str, activations: str = "f32"):
    """x: [M, K] float; blocks: [N, K/32 * block bytes] -> x @ dequant(blocks).T: [M, N] in x's dtype
    (x first rounded per 32-block to int8 when activations is "int8")."""
    w = dequantize_blocks(blocks, ggml_type)
    xf = quantize_activation_blocks(x) if activations == "int8" else x.astype(jnp.float32)
    y = jnp.dot(xf, w.T, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
