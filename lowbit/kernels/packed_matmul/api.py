"""`packed_matmul(x, w)`: activations times a bit-packed low-bit weight, Pallas, native CPU or XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowbit.core.packing import PackedArray
from lowbit.kernels.dispatch import NATIVE_MAX_ROWS, check_activations, choose_activations, resolve_impl
from lowbit.kernels.packed_matmul.native import (
    activation_block,
    int8_supports,
    native_supports,
    packed_matmul_native,
)
from lowbit.kernels.packed_matmul.pallas import PackedMatmulConfig, packed_matmul_pallas, plan_tiles, select_config
from lowbit.kernels.packed_matmul.reference import float_scales, packed_matmul_reference, weight_format

_reference_jit = jax.jit(packed_matmul_reference)
_native_jit = jax.jit(packed_matmul_native, static_argnames=("fmt", "activations", "xla_rows"))

ACTIVATION_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def round_activations(x, fmt, k: int):
    """x: [M, K] -> float32 x rounded as activations="int8" rounds it (per row and `activation_block`:
    round(x / d) * d, d = max|x| / 127, clamped to +-127), with a straight-through gradient."""
    group_size, block = activation_block(fmt, k)
    kp = -(-k // group_size) * group_size
    x = x.astype(jnp.float32)
    blocks = jnp.pad(x, ((0, 0), (0, kp - k))).reshape(x.shape[0], kp // block, block)
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 127.0
    inverse = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    rounded = (jnp.clip(jnp.round(blocks * inverse), -127, 127) * d).reshape(x.shape[0], kp)[:, :k]
    return x + jax.lax.stop_gradient(rounded - x)


def packed_matmul(
    x,
    w: PackedArray,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    config: PackedMatmulConfig | None = None,
    activations: str = "f32",
):
    """y = x @ dequant(w) with float32 accumulation, returned in x's dtype.

    x: [..., K] float32/bfloat16/float16 activations. w: PackedArray of a [K, N] weight packed
    along K (`pack(quantize(w, spec))`): int4 or int2 (symmetric or asymmetric) with group,
    channel or tensor scales, nf4/fp4 code books (scales double-quantized or not), ternary packed
    with `ternary="int2"`, or binary. Returns [..., N]. Differentiable in x on every path; with
    impl "native" the gradient dy @ W.T also runs on the packed bytes (no float W is formed).
    impl: "auto" (Pallas on GPU, the native CPU kernels on CPU where built: their GEMV below
    NATIVE_GEMM_ROWS rows of x, their blocked GEMM up to NATIVE_MAX_ROWS, above that (f32
    activations) the weight dequantized natively and XLA's GEMM, as gguf_matmul does; else XLA),
    "pallas", "native" (GEMV below NATIVE_GEMM_ROWS rows, the blocked GEMM on the packed bytes
    above, never a float W) or "xla";
    "auto" falls back to XLA for layouts a kernel cannot take (Pallas: code books, partial groups).
    interpret: run the Pallas kernel in interpret mode (None: only when there is no GPU). config:
    tile sizes (None: by regime).
    activations: "f32" (default: x as it is, the float product within rounding) or "int8" for integer
    codes (int4/int2 sym or asym, ternary, binary; not nf4/fp4): each row of x rounded per block of at
    most 256 inputs inside a group (`activation_block`) to round(x / d) * d, d = max|x| / 127, as
    ggml's q8 does; the native kernel then multiplies in integers (its int8 GEMV at every row count),
    the other impls multiply the same rounded x in float (same result within float rounding). An
    inference option: the gradient passes the rounding straight through and stays f32. "auto":
    "int8" where the native GEMV runs (fewer than NATIVE_GEMM_ROWS rows, integer codes), else "f32".
    """
    fmt = weight_format(w)
    k, n = w.shape
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"x must be an array [..., K], got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., K] with K={k} (w is [{k}, {n}]), got {tuple(x.shape)}")
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in ACTIVATION_DTYPES]:
        raise ValueError(f"x must be float32, bfloat16 or float16, got dtype {x.dtype}")
    if config is not None and not isinstance(config, PackedMatmulConfig):
        raise ValueError(f"config must be a PackedMatmulConfig or None, got {type(config).__name__}")
    check_activations(activations)
    if activations == "int8" and fmt.levels is not None:
        raise ValueError(f"activations='int8': {int8_supports(fmt)}; use activations='f32'")
    w = float_scales(w)
    requested = impl
    impl, interpret = resolve_impl(impl, interpret, has_native=True)
    lead = x.shape[:-1]
    x2 = jnp.reshape(x, (-1, k))
    m = x2.shape[0]
    activations = choose_activations(activations, impl, m, int8_supports(fmt) is None)
    if m == 0:
        return jnp.zeros((*lead, n), x.dtype)
    if impl == "native":
        reason = native_supports(fmt)
        if reason is None:
            xla_rows = NATIVE_MAX_ROWS if requested == "auto" else None
            y = _native_jit(x2, w, fmt, activations=activations, xla_rows=xla_rows)
            return y.astype(x.dtype).reshape(*lead, n)
        if requested != "auto":
            raise ValueError(f"w: {reason}; the native kernel cannot take it (use impl='xla')")
    if activations == "int8":
        x2 = round_activations(x2, fmt, k).astype(x.dtype)
    plan = None
    if impl == "pallas":
        try:
            plan = plan_tiles(m, k, n, fmt, config or select_config(m), interpret=interpret)
        except ValueError:
            if requested != "auto":  # "auto" falls back to XLA for layouts the kernel cannot tile
                raise
    if plan is None:
        y = _reference_jit(x2, w)
    else:
        y = packed_matmul_pallas(x2, w.data, w.scale, w.zero, fmt=fmt, plan=plan, interpret=interpret)
    return y.reshape(*lead, n)
