"""Exact bit packing of quantization codes into uint8, along the reduction axis.

Layouts (element i of the packed axis; all little-endian within a byte):
  4-bit: byte j holds element 2j (low nibble) and 2j+1 (high nibble)
  2-bit: byte j holds elements 4j..4j+3 at bit offsets 0, 2, 4, 6 (ternary codes too)
  1-bit: byte j holds elements 8j..8j+7 at bits 0..7
  base-3 (ternary): byte j = sum_n t[5j+n] * 3**n with trits t = code + 1 (1.6 bits each)
  3/5/6/7-bit: bit planes, plane p = 1-bit packing of bit p of every code, planes concatenated
  8-bit: the bytes themselves (int8 / fp8 bit patterns)
A length that is not a multiple of the elements per byte is padded with code 0 and the
logical length is kept, so every round trip is exact. The 6-bit group-scale codes of a
super-block spec are packed as bit planes of the flattened scale array (PackedSubScales).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from lowbit.core.quantize import FP8_DTYPES, QArray, stat_shape
from lowbit.core.spec import SUB_SCALE_BITS, QuantSpec

FORMATS = ("int4", "int2", "bits1", "base3", "planes", "bytes")


def _pad_last(u, multiple: int):
    pad = -u.shape[-1] % multiple
    if pad:
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    return u


def _pack_fields(u, bits: int):
    """Pack unsigned codes (< 2**bits, bits in 1, 2, 4) along the last axis."""
    per_byte = 8 // bits
    u = _pad_last(u.astype(jnp.uint8), per_byte)
    u = u.reshape(*u.shape[:-1], -1, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    return jnp.bitwise_or.reduce(u << shifts, axis=-1).astype(jnp.uint8)


def _unpack_fields(p, bits: int, n: int):
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    u = (p[..., None] >> shifts) & jnp.uint8(2**bits - 1)
    return u.reshape(*p.shape[:-1], -1)[..., :n]


def pack_int4(u):
    """Two 4-bit codes per byte (element 2j low nibble, 2j+1 high) along the last axis."""
    return _pack_fields(u, 4)


def unpack_int4(p, n: int):
    return _unpack_fields(p, 4, n)


def pack_int2(u):
    """Four 2-bit codes per byte along the last axis."""
    return _pack_fields(u, 2)


def unpack_int2(p, n: int):
    return _unpack_fields(p, 2, n)


def pack_bits(u):
    """Eight 1-bit codes per byte along the last axis."""
    return _pack_fields(u, 1)


def unpack_bits(p, n: int):
    return _unpack_fields(p, 1, n)


_POW3 = (1, 3, 9, 27, 81)


def pack_base3(t):
    """Five trits (0, 1, 2) per byte: byte = sum t[5j+n] 3**n (max 242)."""
    t = _pad_last(t.astype(jnp.uint8), 5)
    t = t.reshape(*t.shape[:-1], -1, 5)
    return (t * jnp.asarray(_POW3, jnp.uint8)).sum(-1, dtype=jnp.uint8)


def unpack_base3(p, n: int):
    digits = (p[..., None] // jnp.asarray(_POW3, jnp.uint8)) % jnp.uint8(3)
    return digits.reshape(*p.shape[:-1], -1)[..., :n]


def pack_planes(u, bits: int):
    """Any width: `bits` bit planes of ceil(n/8) bytes each, concatenated."""
    return jnp.concatenate([pack_bits((u >> p) & 1) for p in range(bits)], axis=-1)


def unpack_planes(p, bits: int, n: int):
    per_plane = p.shape[-1] // bits
    u = jnp.zeros((*p.shape[:-1], n), jnp.uint8)
    for plane in range(bits):
        chunk = p[..., plane * per_plane:(plane + 1) * per_plane]
        u = u | (unpack_bits(chunk, n) << plane)
    return u


TERNARY_DEFAULT = "int2"


def packed_format(spec: QuantSpec, ternary: str = TERNARY_DEFAULT) -> str:
    """Which layout a spec packs to; ternary uses 'int2' (2 bits, the format packed_matmul and
    freeze run; the default) or 'base3' (1.6 bits, storage only: dequantized before a matmul)."""
    if spec.kind == "ternary":
        if ternary not in ("base3", "int2"):
            raise ValueError(f"ternary packing must be 'base3' or 'int2', got {ternary!r}")
        return ternary
    if spec.kind == "binary":
        return "bits1"
    if spec.bits == 8:
        return "bytes"
    return {4: "int4", 2: "int2"}.get(spec.bits, "planes")


def _to_unsigned(q: QArray):
    spec, c = q.spec, q.codes
    if spec.kind in FP8_DTYPES:
        return jax.lax.bitcast_convert_type(c, jnp.uint8)
    if spec.kind == "binary":
        return (c > 0).astype(jnp.uint8)
    if spec.kind == "ternary":
        return (c + 1).astype(jnp.uint8)
    if spec.kind == "int" and spec.symmetric:
        return (c.astype(jnp.int16) - spec.qmin).astype(jnp.uint8)
    return c.astype(jnp.uint8)


def _from_unsigned(u, spec: QuantSpec):
    if spec.kind in FP8_DTYPES:
        return jax.lax.bitcast_convert_type(u, FP8_DTYPES[spec.kind])
    if spec.kind == "binary":
        return (u.astype(jnp.int8) * 2 - 1).astype(jnp.int8)
    if spec.kind == "ternary":
        return (u.astype(jnp.int8) - 1).astype(jnp.int8)
    if spec.kind == "int" and spec.symmetric:
        return (u.astype(jnp.int16) + spec.qmin).astype(jnp.int8)
    return u


@jax.tree_util.register_pytree_node_class
class PackedSubScales:
    """The group scales (or mins) of a super-block spec as stored: their 6-bit codes bit-packed
    (planes of the flattened [.., groups, ..] array) and the scale_dtype super-scales.
    `unpack()` gives back the QArray of QArray.scale / QArray.zero."""

    def __init__(self, data, super_scale, spec: QuantSpec, axis: int, logical_shape: tuple):
        self.data, self.super_scale = data, super_scale
        self.spec, self.axis, self.logical_shape = spec, axis, tuple(logical_shape)

    def tree_flatten(self):
        return (self.data, self.super_scale), (self.spec, self.axis, self.logical_shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.data) + _nbytes(self.super_scale)

    def unpack(self) -> QArray:
        codes = unpack_planes(self.data, SUB_SCALE_BITS, math.prod(self.logical_shape))
        return QArray(codes.reshape(self.logical_shape), self.super_scale, None, self.spec,
                      self.axis)


def pack_sub_scales(q: QArray) -> PackedSubScales:
    """Packs a super-block spec's scale (or zero) QArray: 6 bits per group."""
    data = pack_planes(q.codes.reshape(-1).astype(jnp.uint8), SUB_SCALE_BITS)
    return PackedSubScales(data, q.scale, q.spec, q.axis, q.codes.shape)


@jax.tree_util.register_pytree_node_class
class PackedArray:
    """Packed codes (uint8, packed along `axis`) plus the QArray's scales: exact storage.

    `nbytes` counts codes, scales and offsets; `bits_per_weight` = 8 * nbytes / elements.
    """

    def __init__(self, data, scale, zero, spec: QuantSpec, axis: int, shape: tuple, fmt: str):
        self.data, self.scale, self.zero = data, scale, zero
        self.spec, self.axis, self.shape, self.format = spec, axis, tuple(shape), fmt

    def tree_flatten(self):
        return (self.data, self.scale, self.zero), (self.spec, self.axis, self.shape, self.format)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def __repr__(self) -> str:
        return (f"PackedArray(shape={self.shape}, spec='{self.spec}', format={self.format}, "
                f"bits_per_weight={self.bits_per_weight:.4f})")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        total = self.data.size * self.data.dtype.itemsize
        for part in (self.scale, self.zero):
            total += _nbytes(part)
        return total

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size

    def expand_scales(self) -> "PackedArray":
        """The same codes with plain f32 group scales and offsets (a super-block spec's 6-bit
        codes times their super-scales; the spec loses its ssN): what packed_matmul runs."""
        if self.spec.super_block is None:
            return self
        scale, zero = self.scale.unpack().dequantize(), None
        if self.zero is not None:
            zero = self.zero.unpack().dequantize()
        spec = dataclasses.replace(self.spec, super_block=None, scale_dtype="f32")
        return PackedArray(self.data, scale, zero, spec, self.axis, self.shape, self.format)

    def unpack(self) -> QArray:
        n = self.shape[self.axis] if self.shape else 1
        p = jnp.moveaxis(self.data, self.axis, -1) if self.shape else self.data.reshape(1)
        if self.format == "int4":
            u = unpack_int4(p, n)
        elif self.format == "int2":
            u = unpack_int2(p, n)
        elif self.format == "bits1":
            u = unpack_bits(p, n)
        elif self.format == "base3":
            u = unpack_base3(p, n)
        elif self.format == "planes":
            u = unpack_planes(p, self.spec.bits, n)
        else:
            u = p
        u = jnp.moveaxis(u, -1, self.axis).reshape(self.shape)
        scale, zero = self.scale, self.zero
        if self.spec.super_block is not None:
            scale = scale.unpack()
            zero = None if zero is None else zero.unpack()
        return QArray(_from_unsigned(u, self.spec), scale, zero, self.spec, self.axis)

    def dequantize(self, dtype=jnp.float32):
        return self.unpack().dequantize(dtype)


def _nbytes(part) -> int:
    if part is None:
        return 0
    if isinstance(part, QArray):
        return sum(_nbytes(x) for x in (part.codes, part.scale, part.zero))
    if isinstance(part, PackedSubScales):
        return part.nbytes
    return part.size * part.dtype.itemsize


def storage_bits(spec: QuantSpec, shape, axis: int = 0, ternary: str = TERNARY_DEFAULT) -> int:
    """Exact bits `pack(quantize(x, spec, axis))` stores for an array of `shape` (codes,
    scales, offsets), by formula. With super-blocks: b bits per weight, 6 bits per group scale
    (and min), one scale_dtype super-scale (and super-min) per super-block, each 6-bit plane
    padded to whole bytes: int4:g32:ss256:asym (Q4_K) is 4 + 12/32 + 32/256 = 4.5 bits per
    weight, int4:g32:ss256 4.25, int3:g32:ss256 3.25, where int4:g32 (f16 scales) is 4.5."""
    shape = tuple(int(d) for d in shape)
    axis = axis % len(shape) if shape else 0
    n = shape[axis] if shape else 1
    rest = math.prod(shape) // n
    fmt = packed_format(spec, ternary)
    per_byte = {"int4": 2, "int2": 4, "bits1": 8, "base3": 5}.get(fmt)
    if per_byte is not None:
        code_bytes = rest * -(-n // per_byte)
    elif fmt == "planes":
        code_bytes = rest * spec.bits * -(-n // 8)
    else:
        code_bytes = rest * n
    stats = math.prod(stat_shape(shape, spec, axis))
    offsets = 0 if spec.symmetric else 1
    if spec.super_block is not None:
        groups = stats // rest
        supers = rest * -(-groups // spec.groups_per_super_block)
        per_stat = SUB_SCALE_BITS * 8 * -(-stats // 8) + spec.scale_bits * supers
        return 8 * code_bytes + (1 + offsets) * per_stat
    if spec.double_quant:
        raise ValueError("storage_bits does not cover double-quantized scales (dq); use "
                         "8 * pack(q).nbytes")
    return 8 * code_bytes + (1 + offsets) * spec.scale_bits * stats


def pack(q: QArray, ternary: str = TERNARY_DEFAULT) -> PackedArray:
    """Pack a QArray's codes along its reduction axis; ternary: 'int2' (default, the format
    packed_matmul and freeze use) or 'base3' (1.6 bits per weight, storage only)."""
    fmt = packed_format(q.spec, ternary)
    u = _to_unsigned(q)
    u = jnp.moveaxis(u, q.axis, -1) if u.ndim else u.reshape(1)
    if fmt == "int4":
        p = pack_int4(u)
    elif fmt == "int2":
        p = pack_int2(u)
    elif fmt == "bits1":
        p = pack_bits(u)
    elif fmt == "base3":
        p = pack_base3(u)
    elif fmt == "planes":
        p = pack_planes(u, q.spec.bits)
    else:
        p = u
    p = jnp.moveaxis(p, -1, q.axis) if q.codes.ndim else p
    scale, zero = q.scale, q.zero
    if q.spec.super_block is not None:
        scale = pack_sub_scales(scale)
        zero = None if zero is None else pack_sub_scales(zero)
    return PackedArray(p, scale, zero, q.spec, q.axis, q.shape, fmt)
