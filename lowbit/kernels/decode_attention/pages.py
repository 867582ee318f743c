"""Quantized KV page pools (int8, or int4 packed two per byte along head_dim) and their dequantization.

`dequantize_page_fields` is the one definition of code -> value, shared by kernel and reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowbit.core.packing import pack_int4
from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec

KV_KINDS = ("int8", "int4")
_BITS = {"int8": 8, "int4": 4}


def kind_fields(kind: str) -> int:
    """How many head_dim elements share a stored code byte (1 for floats and int8, 2 for int4)."""
    return 2 if kind == "int4" else 1


def pack_codes(codes, kind: str, symmetric: bool):
    """Core integer codes [..., head_dim] (signed when symmetric) -> what pools store: int8 codes
    as int8 (uint8 if asymmetric); int4 as uint8 nibbles u (u = code + 8 when symmetric), element
    2j of head_dim in the low nibble and 2j+1 in the high one. The one int4/int8 KV encoding,
    shared by lowbit.kvcache and the kernels."""
    if kind == "int8":
        return codes.astype(jnp.int8 if symmetric else jnp.uint8)
    if kind != "int4":
        raise ValueError(f"kind must be one of {KV_KINDS}, got {kind!r}")
    unsigned = codes.astype(jnp.int16) + (8 if symmetric else 0)
    return pack_int4(unsigned.astype(jnp.uint8))


def dequantize_page_fields(codes, scale, zero, kind: str) -> tuple:
    """Codes -> float32 values, split in `kind_fields(kind)` fields along head_dim: the one int4 /
    int8 KV decoding, used by the Pallas kernel, the reference and lowbit.kvcache.

    codes: [..., head_dim / F]. scale, zero (zero may be None): [..., n_groups], one per group of
    head_dim / n_groups consecutive channels (n_groups 1: per token and head; head_dim: per
    channel, e.g. KIVI keys). Field f holds head_dim elements f, f + F, ... (for int4: the low
    nibbles, then the high ones).
    """
    if kind == "int8":
        values = (codes.astype(jnp.float32),)
    elif kind == "int4":
        offset = 0.0 if zero is not None else 8.0
        values = tuple(((codes >> shift) & 15).astype(jnp.float32) - offset for shift in (0, 4))
    else:
        raise ValueError(f"kind must be one of {KV_KINDS}, got {kind!r}")
    width = codes.shape[-1]
    out = []
    for f, v in enumerate(values):
        v = v * _field_stat(scale, f, len(values), width)
        if zero is not None:
            v = v + _field_stat(zero, f, len(values), width)
        out.append(v)
    return tuple(out)


def _field_stat(stat, field: int, fields: int, width: int):
    """The scale/zero of each element of field `field` ([..., width] elements): a [..., 1] stat
    as is; per channel every F-th; per group of G channels each stat repeated G / F times."""
    stat = stat.astype(jnp.float32)
    groups = stat.shape[-1]
    if groups == 1:
        return stat
    head_dim = width * fields
    if groups == head_dim:
        return stat if fields == 1 else stat[..., field::fields]
    repeat = head_dim // groups // fields
    expanded = jnp.broadcast_to(stat[..., None], (*stat.shape, repeat))
    return expanded.reshape(*stat.shape[:-1], groups * repeat)


def groups_supported(head_dim: int, n_groups: int, fields: int) -> bool:
    """Whether pools can hold n_groups scales per token and head: the groups divide head_dim and
    (int4) a group is one channel or an even number of them."""
    if n_groups < 1 or head_dim % n_groups:
        return False
    group = head_dim // n_groups
    return n_groups == 1 or group == 1 or group % fields == 0


def interleave_fields(fields) -> jax.Array:
    """Inverse of the field split: F arrays [..., D/F] -> [..., D] (element d from field d % F)."""
    if len(fields) == 1:
        return fields[0]
    stacked = jnp.stack(fields, axis=-1)
    return stacked.reshape(*stacked.shape[:-2], -1)


@jax.tree_util.register_pytree_node_class
class QuantizedPagePool:
    """A paged K or V cache stored as codes plus per-(token, head) scales (and zeros if asymmetric).

    codes: int8 [P, page_size, n_kv_heads, head_dim] (uint8 if asymmetric) for kind "int8";
    uint8 [P, page_size, n_kv_heads, head_dim / 2] for kind "int4", element 2j of head_dim in
    the low nibble and 2j+1 in the high one.
    scale, zero: [P, page_size, n_kv_heads, 1]; zero is None for symmetric codes.
    Symmetric: int8 codes are signed, an int4 nibble u means u - 8; value = code * scale.
    Asymmetric: codes are unsigned (uint8, or the nibble u itself); value = code * scale + zero.
    """

    def __init__(self, codes, scale, zero, kind: str):
        self.codes, self.scale, self.zero, self.kind = codes, scale, zero, kind

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero), (self.kind,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def fields(self) -> int:
        return kind_fields(self.kind)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical [num_pages, page_size, n_kv_heads, head_dim]."""
        p, s, h, d = self.codes.shape
        return (p, s, h, d * self.fields)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.codes, self.scale, self.zero) if a is not None)

    def __repr__(self) -> str:
        return f"QuantizedPagePool(shape={self.shape}, kind={self.kind!r}, symmetric={self.symmetric})"

    def validate(self, name: str = "pages") -> None:
        """Raise ValueError (naming `name`) unless the parts have consistent shapes and dtypes."""
        if self.kind not in KV_KINDS:
            raise ValueError(f"{name}.kind must be one of {KV_KINDS}, got {self.kind!r}")
        if self.codes.ndim != 4:
            last = "head_dim / 2" if self.fields == 2 else "head_dim"
            raise ValueError(f"{name}.codes must be [num_pages, page_size, n_kv_heads, {last}], "
                             f"got shape {tuple(self.codes.shape)}")
        want = jnp.uint8 if (self.kind == "int4" or self.zero is not None) else jnp.int8
        if self.codes.dtype != want:
            raise ValueError(f"{name}.codes must have dtype {jnp.dtype(want).name} for kind {self.kind!r} "
                             f"({'symmetric' if self.symmetric else 'asymmetric'}), got {self.codes.dtype}")
        head_dim = self.shape[-1]
        for part_name, part in (("scale", self.scale), ("zero", self.zero)):
            if part is None:
                continue
            if part.ndim != 4 or tuple(part.shape[:3]) != tuple(self.codes.shape[:3]) \
                    or not groups_supported(head_dim, part.shape[-1], self.fields):
                raise ValueError(f"{name}.{part_name} must have shape (*codes.shape[:3], n_groups) with "
                                 f"n_groups groups of channels dividing head_dim={head_dim} (for int4: "
                                 f"1, head_dim, or groups of an even size), got {tuple(part.shape)}")
            if not jnp.issubdtype(part.dtype, jnp.floating):
                raise ValueError(f"{name}.{part_name} must be floating point, got {part.dtype}")

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float pages [P, page_size, n_kv_heads, head_dim]."""
        return interleave_fields(dequantize_page_fields(self.codes, self.scale, self.zero, self.kind)).astype(dtype)


def quantize_pages(pages, kind: str = "int8", *, symmetric: bool = True, scale_dtype: str = "f16",
                   group: int | None = None) -> QuantizedPagePool:
    """Quantize float pages [P, page_size, n_kv_heads, head_dim] per (token, head) over head_dim,
    or per (token, head, group of `group` channels).

    Uses the core quantizer with token or group granularity (`int8:token`, `int4:g32:asym`, ...).
    """
    if kind not in KV_KINDS:
        raise ValueError(f"kind must be one of {KV_KINDS}, got {kind!r}")
    pages = jnp.asarray(pages)
    if pages.ndim != 4:
        raise ValueError(f"pages must be [num_pages, page_size, n_kv_heads, head_dim], got shape {tuple(pages.shape)}")
    if kind == "int4" and pages.shape[-1] % 2:
        raise ValueError(f"pages: int4 packs two codes per byte along head_dim, which must be even, "
                         f"got {pages.shape[-1]}")
    head_dim = pages.shape[-1]
    if group is not None and (not isinstance(group, int) or group < 1
                              or not groups_supported(head_dim, head_dim // group, kind_fields(kind))
                              or head_dim % group):
        raise ValueError(f"group must divide head_dim={head_dim} (for int4: 1 or even), got {group!r}")
    if group is None or group == head_dim:
        spec = QuantSpec(kind="int", bits=_BITS[kind], symmetric=symmetric, granularity="token",
                         scale_dtype=scale_dtype)
        q = quantize(pages, spec)
    else:
        spec = QuantSpec(kind="int", bits=_BITS[kind], symmetric=symmetric, granularity="group",
                         group_size=group, scale_dtype=scale_dtype)
        q = quantize(pages, spec, axis=3)
    return QuantizedPagePool(pack_codes(q.codes, kind, symmetric), q.scale, q.zero, kind)
