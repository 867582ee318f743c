"""Native CPU packed matmul: the packed bytes go to the C++ kernels through the XLA FFI as they are
(GEMV, blocked GEMM, or a one-call dequantization for XLA's dot at prefill). Differentiable in x (the
gradient g @ W.T runs on the packed bytes); the packed weight is frozen."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.packing import PackedArray
from lowbit.kernels.dispatch import ACTIVATIONS, NATIVE_GEMM_ROWS, check_activations
from lowbit.kernels.packed_matmul.reference import WeightFormat

SCALE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
# Largest block of inputs sharing one activation scale (ggml's Q8_K block; a group of at most this
# many inputs is one block).
MAX_ACTIVATION_BLOCK = 256


def native_supports(fmt: WeightFormat) -> str | None:
    """None when the native kernel takes this format, else why not."""
    if fmt.group_size is not None and fmt.group_size % fmt.fields:
        return (f"group_size {fmt.group_size} is not a multiple of the {fmt.fields} codes per byte "
                f"of the {fmt.bits}-bit format")
    return None


def int8_supports(fmt: WeightFormat) -> str | None:
    """None when int8 activations can meet this format's codes exactly in integers, else why not."""
    if fmt.levels is not None:
        return f"the {fmt.bits}-bit code book (nf4/fp4) has non-integer levels; int8 activations need integer codes"
    return native_supports(fmt)


def activation_block(fmt: WeightFormat, k: int) -> tuple[int, int]:
    """(group_size, block) for int8 activations over a packed weight of K inputs: each row of x is
    rounded in blocks of `block` inputs (the largest divisor of the group size that is at most
    MAX_ACTIVATION_BLOCK and a whole number of packed rows), K zero padded to whole groups."""
    group_size = fmt.group_size or -(-k // fmt.fields) * fmt.fields
    step = fmt.fields if group_size % fmt.fields == 0 else 1  # (groups of part of a byte: XLA only)
    block = max(d for d in range(step, min(group_size, MAX_ACTIVATION_BLOCK) + 1, step) if group_size % d == 0)
    return group_size, block


def _stat(table, groups: int, n: int):
    """A scale or zero table as [groups, N] in a dtype the kernel reads (f32, f16 or bf16)."""
    if jnp.dtype(table.dtype) not in [jnp.dtype(d) for d in SCALE_DTYPES]:
        table = table.astype(jnp.float32)
    return jnp.broadcast_to(table, (groups, n))


def _attributes(fmt: WeightFormat, group_size: int) -> dict:
    """FFI attributes (the kernels also take the code values, `WeightFormat.code_values()`, as an input)."""
    return dict(bits=np.int64(fmt.bits), group_size=np.int64(group_size), has_zero=np.int64(fmt.asymmetric))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _product(x, data, scale, zero, fmt: WeightFormat, group_size: int, gemm_rows: int, activations: str, block: int,
             xla_rows: int | None):
    """x: f32 [M, K] times the packed [K, N] weight (data, scale and zero as the kernel reads them)."""
    if activations == "f32" and xla_rows is not None and x.shape[0] > xla_rows:
        w = _dequantize(data, scale, zero, fmt, group_size, x.shape[1])
        return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    call = jax.ffi.ffi_call("lowbit_packed_matmul", jax.ShapeDtypeStruct((x.shape[0], data.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(x, data, scale, zero, jnp.asarray(fmt.code_values()), **_attributes(fmt, group_size),
                gemm_rows=np.int64(gemm_rows), activations=np.int64(ACTIVATIONS.index(activations)),
                block=np.int64(block))


def _dequantize(data, scale, zero, fmt: WeightFormat, group_size: int, k: int):
    """The float W [K, N] of a packed weight, on all cores (the XLA reference's values)."""
    call = jax.ffi.ffi_call("lowbit_packed_dequantize", jax.ShapeDtypeStruct((k, data.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(data, scale, zero, jnp.asarray(fmt.code_values()), **_attributes(fmt, group_size))


def _product_forward(x, data, scale, zero, fmt, group_size, gemm_rows, activations, block, xla_rows):
    y = _product(x, data, scale, zero, fmt, group_size, gemm_rows, activations, block, xla_rows)
    return y, (x.shape, data, scale, zero)


def _product_backward(fmt, group_size, gemm_rows, activations, block, xla_rows, residuals, g):
    """x-bar = g @ W.T from the packed bytes (`lowbit_packed_matmul_transposed`, the blocked GEMM at
    every row count) in f32 also for int8 activations (their rounding passes the gradient straight
    through); no gradient for the frozen weight (its codes are integers, its scales and zeros are not
    trained here)."""
    x_shape, data, scale, zero = residuals
    call = jax.ffi.ffi_call("lowbit_packed_matmul_transposed", jax.ShapeDtypeStruct(x_shape, jnp.float32),
                            vmap_method="sequential")
    x_bar = call(g.astype(jnp.float32), data, scale, zero, jnp.asarray(fmt.code_values()),
                 **_attributes(fmt, group_size))
    return x_bar, None, None, None


_product.defvjp(_product_forward, _product_backward)


def packed_matmul_native(x, w: PackedArray, fmt: WeightFormat, gemm_rows: int = NATIVE_GEMM_ROWS,
                         activations: str = "f32", xla_rows: int | None = None):
    """x: float32 [M, K]; w: packed [K, N] -> float32 [M, N], on the CPU through `lowbit_packed_matmul`.
    activations "f32": the GEMV kernel below `gemm_rows` rows of x, the blocked GEMM from there on, or,
    above `xla_rows` rows (None: never), the weight dequantized natively for this call and XLA's GEMM
    (faster where XLA's dot has wider SIMD, benchmarks/RESULTS.md; a float copy of this one weight
    while the call runs); "int8" (integer codes only, `int8_supports`): x rounded per row and
    `activation_block` inside the kernel, integer dots, the int8 GEMV at every row count. The gradient
    always runs the f32 GEMM on the packed bytes (no float W is kept for it)."""
    check_activations(activations, ACTIVATIONS)
    if activations == "int8" and (reason := int8_supports(fmt)) is not None:
        raise ValueError(f"activations='int8': {reason}")
    rows, n = w.data.shape
    group_size, block = activation_block(fmt, rows * fmt.fields)  # channel/tensor: one group of padded K
    groups = -(-rows * fmt.fields // group_size)  # a partial last group has its own scale row
    scale = _stat(w.scale, groups, n)
    zero = _stat(w.zero, groups, n) if fmt.asymmetric else jnp.zeros((1, 1), jnp.float32)
    return _product(x.astype(jnp.float32), w.data, scale, zero, fmt, group_size, gemm_rows, activations, block,
                    xla_rows)
