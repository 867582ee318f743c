"""`int8_matmul`: W8A8 matmul (Pallas, native CPU or XLA) of int8 activation and weight codes with per-token/per-channel scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowbit.kernels.dispatch import NATIVE_MAX_ROWS, resolve_impl
from lowbit.kernels.int8_matmul.native import int8_matmul_native
from lowbit.kernels.int8_matmul.pallas import Int8MatmulConfig, int8_matmul_pallas, plan_tiles, select_config
from lowbit.kernels.int8_matmul.reference import int8_matmul_reference

OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_reference_jit = jax.jit(int8_matmul_reference, static_argnames=("out_dtype",))
_native_jit = jax.jit(int8_matmul_native, static_argnames=("out_dtype",))


def _check_codes(a, name: str, ndim_min: int):
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise ValueError(f"{name} must be an int8 array, got {type(a).__name__}")
    if a.dtype != jnp.int8:
        raise ValueError(f"{name} must have dtype int8, got {a.dtype}")
    if a.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {tuple(a.shape)}")


def _check_scale(s, name: str, allowed: list[tuple[int, ...]]):
    s = jnp.asarray(s)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {s.dtype}")
    if tuple(s.shape) not in allowed:
        raise ValueError(f"{name} must have one of the shapes {allowed}, got {tuple(s.shape)}")
    return s


def int8_matmul(
    x_codes,
    x_scale,
    w_codes,
    w_scale,
    *,
    out_dtype=jnp.float32,
    impl: str = "auto",
    interpret: bool | None = None,
    config: Int8MatmulConfig | None = None,
):
    """y = (x_codes @ w_codes) * x_scale * w_scale, accumulated in int32: [..., N] in out_dtype.

    x_codes: int8 [..., K]; x_scale: per token, [..., 1] or [...] (or a scalar);
    w_codes: int8 [K, N]; w_scale: per channel, [1, N] or [N] (or a scalar).
    impl: "auto" (Pallas on GPU, the native CPU kernel on CPU where built, else XLA), "pallas",
    "native" or "xla". The int32 accumulator is exact for K < 133,000 (127 * 128 * K < 2**31).
    """
    _check_codes(x_codes, "x_codes", 1)
    _check_codes(w_codes, "w_codes", 2)
    if w_codes.ndim != 2:
        raise ValueError(f"w_codes must be 2-D [K, N], got shape {tuple(w_codes.shape)}")
    k, n = w_codes.shape
    if x_codes.shape[-1] != k:
        raise ValueError(f"x_codes must have shape [..., K] with K={k} (w_codes is [{k}, {n}]), "
                         f"got {tuple(x_codes.shape)}")
    lead = tuple(x_codes.shape[:-1])
    x_scale = _check_scale(x_scale, "x_scale", [(*lead, 1), lead, ()])
    w_scale = _check_scale(w_scale, "w_scale", [(1, n), (n,), ()])
    if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if config is not None and not isinstance(config, Int8MatmulConfig):
        raise ValueError(f"config must be an Int8MatmulConfig or None, got {type(config).__name__}")
    requested = impl
    impl, interpret = resolve_impl(impl, interpret, has_native=True)
    x2 = x_codes.reshape(-1, k)
    m = x2.shape[0]
    xs = jnp.broadcast_to(x_scale.reshape(-1, 1) if x_scale.ndim else x_scale, (m, 1)).astype(jnp.float32)
    ws = jnp.broadcast_to(w_scale.reshape(1, -1) if w_scale.ndim else w_scale, (1, n)).astype(jnp.float32)
    if m == 0:
        return jnp.zeros((*lead, n), out_dtype)
    if impl == "native" and requested == "auto" and m > NATIVE_MAX_ROWS:
        impl = "xla"  # prefill: XLA's int8 GEMM
    if impl == "native":
        y = _native_jit(x2, xs, w_codes, ws, out_dtype=jnp.dtype(out_dtype))
    elif impl == "xla":
        y = _reference_jit(x2, xs, w_codes, ws, out_dtype=jnp.dtype(out_dtype))
    else:
        plan = plan_tiles(m, k, n, config or select_config(m))
        y = int8_matmul_pallas(x2, xs, w_codes, ws, plan=plan, out_dtype=jnp.dtype(out_dtype), interpret=interpret)
    return y.reshape(*lead, n)
