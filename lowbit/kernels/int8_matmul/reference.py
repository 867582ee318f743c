"""Pure-jnp W8A8 matmul: int8 x int8 -> int32 accumulation, then per-token x per-channel rescale."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def int8_matmul_reference(x_codes, x_scale, w_codes, w_scale, out_dtype=jnp.float32):
    """x_codes: int8 [M, K]; x_scale: [M, 1]; w_codes: int8 [K, N]; w_scale: [1, N] -> [M, N].

    y = (x_codes @ w_codes) * x_scale * w_scale, the product accumulated exactly in int32.
    """
    acc = jax.lax.dot_general(
        x_codes, w_codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32) * w_scale.astype(jnp.float32)
    return y.astype(out_dtype)
