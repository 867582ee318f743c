"""`gguf_matmul(x, blocks, ggml_type)`: activations times GGUF weight blocks, native CPU or XLA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowbit.kernels.dispatch import NATIVE_MAX_ROWS, check_activations, choose_activations, resolve_impl
from lowbit.kernels.gguf_matmul.native import gguf_dequantize_native, gguf_matmul_native
from lowbit.kernels.gguf_matmul.reference import check_blocks, gguf_matmul_reference

ACTIVATION_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
IMPLS = ("auto", "native", "xla")
_reference_jit = jax.jit(gguf_matmul_reference, static_argnames=("ggml_type", "activations"))


@functools.partial(jax.jit, static_argnames=("ggml_type", "activations"))
def _native_jit(x, blocks, ggml_type, activations):
    return gguf_matmul_native(x, blocks, ggml_type, activations).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("ggml_type",))
def _native_dequantize_then_dot(x, blocks, ggml_type):
    w = gguf_dequantize_native(blocks, ggml_type)
    return jnp.dot(x.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def gguf_matmul(x, blocks, ggml_type: str, *, impl: str = "auto", activations: str = "f32"):
    """y = x @ W.T for a GGUF weight W [N, K] given as its raw blocks: [..., N] in x's dtype.

    x: [..., K] float32/bfloat16/float16. blocks: uint8 [N, K/32 * block bytes], the tensor's bytes
    from the file with one weight row (output feature) per row. ggml_type: "Q4_0", "Q4_1" or "Q8_0".
    impl: "auto" (where the native CPU kernels are built: their GEMV for up to NATIVE_MAX_ROWS rows
    of x, above that their block dequantization then XLA's dot; else XLA), "native" (GEMV below
    NATIVE_GEMM_ROWS rows, the blocked GEMM over the blocks above, for f32 activations) or "xla".
    Differentiable in x on every path; natively x-bar = g @ W runs over the blocks (no float W).
    activations: "f32" (default: x as it is, so a model on the blocks equals its f32-dequantized load
    within float rounding) or "int8" (x rounded per row and 32-block to int8 as ggml does, integer
    block dots; an extra rounding of x of up to 0.4% of each block's max; every impl rounds the same way)
    or "auto" ("int8" on the native impl below NATIVE_GEMM_ROWS rows of x, else "f32").
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_activations(activations)
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim < 1:
        raise ValueError(f"x must be an array [..., K], got {type(x).__name__}")
    n, k = check_blocks(blocks, ggml_type, x.shape[-1])
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in ACTIVATION_DTYPES]:
        raise ValueError(f"x must be float32, bfloat16 or float16, got dtype {x.dtype}")
    resolved, _ = resolve_impl(impl, None, has_native=True)
    lead = x.shape[:-1]
    x2 = jnp.reshape(x, (-1, k))
    activations = choose_activations(activations, resolved, x2.shape[0])
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), x.dtype)
    if resolved == "native" and (impl == "native" or x2.shape[0] <= NATIVE_MAX_ROWS):
        y = _native_jit(x2, blocks, ggml_type, activations)
    elif resolved == "native" and activations == "f32":  # prefill under "auto": dequantize once, XLA's GEMM
        y = _native_dequantize_then_dot(x2, blocks, ggml_type)
    else:  # "xla", int8 prefill, or Pallas chosen by "auto" on a GPU (this op has no Pallas kernel)
        y = _reference_jit(x2, blocks, ggml_type, activations)
    return y.reshape(*lead, n)
