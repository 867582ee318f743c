"""Pure-jnp packed matmul y = x @ dequant(W): unpack each bit field, dequantize, contract.

Also holds what the kernel shares with it: the format checks and the strided split of x.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.packing import PackedArray
from lowbit.core.quantize import QArray, codebook

# packed format -> bits per code
_FORMAT_BITS = {"int4": 4, "int2": 2, "bits1": 1}


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """What the matmul needs to know about a packed [K, N] weight (hashable, static under jit).

    A stored unsigned code u in a field of `bits` bits means the integer
    `code_multiplier * u + code_offset`, or `levels[u]` for a code book (nf4/fp4); the weight is
    that value times its group's scale, plus the group's zero when `asymmetric`. `group_size` is
    None for one scale per column; when it does not divide K, the last group is shorter.
    """

    bits: int
    code_multiplier: int
    code_offset: int
    asymmetric: bool
    group_size: int | None
    levels: tuple[float, ...] | None = None

    @property
    def fields(self) -> int:
        """Codes per byte (2, 4 or 8)."""
        return 8 // self.bits

    def code_values(self) -> np.ndarray:
        """float32 [2**bits]: the value each stored code u stands for (before its scale)."""
        if self.levels is not None:
            return np.asarray(self.levels, np.float32)
        return (self.code_multiplier * np.arange(1 << self.bits) + self.code_offset).astype(np.float32)


def weight_format(w) -> WeightFormat:
    """Check that `w` is a packed [K, N] weight the matmul supports and describe its codes."""
    if not isinstance(w, PackedArray):
        raise ValueError(f"w must be a lowbit.core.packing.PackedArray (from pack(quantize(...))), "
                         f"got {type(w).__name__}")
    spec = w.spec
    if len(w.shape) != 2 or w.axis != 0:
        raise ValueError(
            f"w must be a 2-D weight [K, N] packed along axis 0 (Flax [in, out] layout), "
            f"got shape {w.shape} packed along axis {w.axis}"
        )
    if w.format == "base3":
        raise ValueError("w: ternary weights packed in base 3 are not supported; "
                         "pack them with pack(q, ternary='int2')")
    if w.format not in _FORMAT_BITS:
        raise ValueError(
            f"w: packed format {w.format!r} (spec '{spec}') is not supported; supported: int4 and int2 "
            "(kind int, symmetric or asymmetric), ternary packed with ternary='int2', binary; "
            "for 8-bit weights use int8_matmul"
        )
    bits = _FORMAT_BITS[w.format]
    levels = None
    if spec.kind == "int" and spec.bits == bits:
        multiplier, offset = 1, (spec.qmin if spec.symmetric else 0)
    elif spec.kind in ("nf4", "fp4") and bits == 4:
        multiplier, offset, levels = 1, 0, tuple(float(v) for v in codebook(spec))
    elif spec.kind == "ternary" and bits == 2:
        multiplier, offset = 1, -1
    elif spec.kind == "binary" and bits == 1:
        multiplier, offset = 2, -1
    else:
        raise ValueError(f"w: spec '{spec}' in packed format {w.format!r} is not supported")
    if spec.granularity == "token":
        raise ValueError(f"w: spec '{spec}' has token granularity; weights need group, channel or tensor scales")
    k, n = w.shape
    group_size = None
    if spec.granularity == "group":
        group_size = spec.group_size
    groups = -(-k // group_size) if group_size else 1  # a partial last group has its own scale
    expected = [(groups, n)] if group_size else [(1, n), (1, 1)]
    scale_shape = tuple(w.scale.shape)
    if isinstance(w.scale, QArray):  # double quantization: the flattened [groups, N] scales, quantized
        scale_shape = expected[0] if w.scale.size == expected[0][0] * expected[0][1] else scale_shape
    if scale_shape not in expected:
        raise ValueError(f"w: scale has shape {tuple(w.scale.shape)}, expected {expected[0]} for spec '{spec}'")
    if (w.zero is not None) != (not spec.symmetric):
        raise ValueError(f"w: zero must be present exactly for asymmetric specs (spec '{spec}')")
    if w.zero is not None and tuple(w.zero.shape) != tuple(w.scale.shape):
        raise ValueError(f"w: zero has shape {tuple(w.zero.shape)}, expected the scale's {tuple(w.scale.shape)}")
    return WeightFormat(bits, multiplier, offset, not spec.symmetric, group_size, levels)


def float_scales(w: PackedArray) -> PackedArray:
    """w with double-quantized scales dequantized to a float32 [groups, N] table (small: one value
    per group), so that every kernel reads plain scales; other weights unchanged."""
    if not isinstance(w.scale, QArray):
        return w
    groups = w.scale.size // w.shape[1]
    scale = w.scale.dequantize(jnp.float32).reshape(groups, w.shape[1])
    return PackedArray(w.data, scale, w.zero, w.spec, w.axis, w.shape, w.format)


def split_fields(x, fields: int, rows: int):
    """x: [M, K] -> [fields, M, rows]: slice f holds columns f, f+fields, ... (zero padded).

    Column k of x meets K-row k of W, which sits in packed byte row k // fields, field k % fields.
    """
    m, k = x.shape
    pad = rows * fields - k
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)))
    return jnp.transpose(x.reshape(m, rows, fields), (2, 0, 1))


def unpack_field(packed, field: int, bits: int):
    """The unsigned codes stored at bit offset field*bits of every byte."""
    return (packed >> (field * bits)) & ((1 << bits) - 1)


def dequantize_codes(u, fmt: WeightFormat, scale, zero):
    """Unsigned codes (any int dtype) -> float32 weights, with scale/zero broadcast to u."""
    if fmt.levels is not None:
        value = jnp.asarray(fmt.code_values())[u.astype(jnp.int32)]
        out = value * scale
        return out if zero is None else out + zero
    value = u.astype(jnp.float32)
    if fmt.code_multiplier != 1:
        value = value * fmt.code_multiplier
    if fmt.code_offset:
        value = value + fmt.code_offset
    out = value * scale
    if zero is not None:
        out = out + zero
    return out


def _field_stats(stat, fmt: WeightFormat, field: int, rows: int):
    """Per-row scale (or zero) for the K-rows f, f+F, ... of one field: [rows, N] or [1, N]."""
    stat = stat.astype(jnp.float32)
    if fmt.group_size is None:
        return stat
    k_index = jnp.arange(rows) * fmt.fields + field
    group = jnp.minimum(k_index // fmt.group_size, stat.shape[0] - 1)
    return stat[group]


# Bytes of float weight one step of the gradient's loop dequantizes (a tile of packed rows).
GRADIENT_TILE_BYTES = 1 << 18


def _product(x, data, scale, zero, fmt: WeightFormat):
    """f32 [M, K] @ dequant(W) by fields: each field's [rows, N] weights are formed, then contracted."""
    rows = data.shape[0]
    xf = split_fields(x, fmt.fields, rows)
    y = jnp.zeros((x.shape[0], data.shape[1]), jnp.float32)
    for f in range(fmt.fields):
        stat_zero = None if zero is None else _field_stats(zero, fmt, f, rows)
        wf = dequantize_codes(unpack_field(data, f, fmt.bits), fmt, _field_stats(scale, fmt, f, rows), stat_zero)
        y = y + jnp.dot(xf[f], wf, precision=jax.lax.Precision.HIGHEST)
    return y


def _tile_stats(stat, fmt: WeightFormat, field: int, first_row, rows: int):
    """The scale (or zero) of K-rows field, field + F, ... of packed rows [first_row, first_row + rows)."""
    stat = stat.astype(jnp.float32)
    if fmt.group_size is None:
        return stat
    k_index = (first_row + jnp.arange(rows)) * fmt.fields + field
    return stat[jnp.minimum(k_index // fmt.group_size, stat.shape[0] - 1)]


def _transposed_tiled(g, data, scale, zero, fmt: WeightFormat, k: int):
    """g [M, N] @ dequant(W).T -> [M, K], one tile of packed rows dequantized per loop step, so
    that no float [K, N] matrix is formed (lax.map runs the tiles one after another)."""
    rows, n = data.shape
    tile = max(1, min(rows, GRADIENT_TILE_BYTES // (4 * n * fmt.fields)))
    tiles = -(-rows // tile)
    padded = jnp.pad(data, ((0, tiles * tile - rows), (0, 0)))

    def one_tile(t):
        first = t * tile
        codes = jax.lax.dynamic_slice_in_dim(padded, first, tile, 0)
        parts = []
        for f in range(fmt.fields):
            stat_zero = None if zero is None else _tile_stats(zero, fmt, f, first, tile)
            wf = dequantize_codes(unpack_field(codes, f, fmt.bits), fmt, _tile_stats(scale, fmt, f, first, tile),
                                  stat_zero)
            parts.append(jnp.dot(g, wf.T, precision=jax.lax.Precision.HIGHEST))  # [M, tile]
        return jnp.stack(parts, axis=-1).reshape(g.shape[0], tile * fmt.fields)

    out = jax.lax.map(one_tile, jnp.arange(tiles))  # [tiles, M, tile * F]
    return jnp.transpose(out, (1, 0, 2)).reshape(g.shape[0], tiles * tile * fmt.fields)[:, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _frozen_product(x, data, scale, zero, fmt: WeightFormat):
    return _product(x, data, scale, zero, fmt)


def _frozen_product_forward(x, data, scale, zero, fmt):
    return _product(x, data, scale, zero, fmt), (x.shape[1], data, scale, zero)


def _frozen_product_backward(fmt, residuals, g):
    """x-bar = g @ W.T tile by tile; the packed weight is frozen (no cotangent for its scales)."""
    k, data, scale, zero = residuals
    return _transposed_tiled(g, data, scale, zero, fmt, k), None, None, None


_frozen_product.defvjp(_frozen_product_forward, _frozen_product_backward)


def packed_matmul_reference(x, w: PackedArray):
    """x: [M, K] float; w: packed [K, N] -> y = x @ dequant(W): [M, N] in x's dtype (f32 math).

    Differentiable in x only (the packed weight is frozen): the gradient dequantizes W again one
    tile of rows at a time, so a training step keeps no float W alive for its backward pass."""
    fmt = weight_format(w)
    w = float_scales(w)
    return _frozen_product(x.astype(jnp.float32), w.data, w.scale, w.zero, fmt).astype(x.dtype)
