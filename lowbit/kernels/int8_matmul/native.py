"""Native CPU W8A8 matmul through the XLA FFI: exact int32 sums, then the reference's f32 rescale."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def int8_matmul_native(x_codes, x_scale, w_codes, w_scale, out_dtype=jnp.float32):
    """x_codes int8 [M, K], x_scale [M, 1], w_codes int8 [K, N], w_scale [1, N] -> [M, N] out_dtype."""
    m, n = x_codes.shape[0], w_codes.shape[1]
    call = jax.ffi.ffi_call("lowbit_int8_matmul", jax.ShapeDtypeStruct((m, n), jnp.float32),
                            vmap_method="sequential")
    y = call(x_codes, x_scale.astype(jnp.float32), w_codes, w_scale.astype(jnp.float32))
    return y.astype(out_dtype)
