"""Pure-jnp GGUF block matmul: dequantize the raw Q4_0 / Q4_1 / Q8_0 blocks of each row, then contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ggml type name -> (type id of the native kernel, bytes per block of 32 weights)
GGUF_BLOCKS = {"Q4_0": (0, 18), "Q4_1": (1, 20), "Q8_0": (2, 34)}


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


def gguf_matmul_reference(x, blocks, ggml_type: str):
    """x: [M, K] float; blocks: [N, K/32 * block bytes] -> x @ dequant(blocks).T: [M, N] in x's dtype."""
    w = dequantize_blocks(blocks, ggml_type)
    y = jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
