"""How a KV cache stores keys and values: float, int8/int4/int2 per token, or KIVI (keys per
channel over groups of tokens, values per token, the most recent tokens in full precision).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from lowbit.core.packing import pack_int2, unpack_int2
from lowbit.core.quantize import quantize, round_to
from lowbit.core.spec import QuantSpec
from lowbit.kernels.decode_attention.pages import dequantize_page_fields, interleave_fields, pack_codes

FLOAT_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
AXES = ("token", "channel")
BITS = (2, 4, 8)
STAT_BYTES = 2  # scales and zeros are stored in f16
KIVI_RESIDUAL = 128  # KIVI's default R
KIVI_GROUP = 32  # KIVI's G: tokens per key group, channels per value group
INT8_GROUP = 32  # channels per int8 scale: greedy-exact on 8/8 prompts where whole heads gave 7/8
LAYOUT_NAMES = ("f32", "bf16", "f16", "int8", "int4", "int2", "kivi2", "kivi4")


@dataclasses.dataclass(frozen=True)
class TensorFormat:
    """How one of K or V is stored.

    bits: None for float storage in `dtype`; else 2, 4 or 8-bit integer codes packed along head_dim.
    axis: "token": one scale (and zero) per token, KV head and group of `group` channels;
      "channel": one scale (and zero) per channel and KV head over `group` consecutive tokens (KIVI keys).
    group: channels per group for "token" (0 = all of head_dim), tokens per group for "channel".
    symmetric: codes centred on zero (a scale only) or min-max codes with a zero point.
    residual: recent tokens kept in full precision (KIVI's R). "token": the query at position t sees
      positions > t - residual in float. "channel": a group is quantized once `max(residual, group)`
      tokens have gathered (whole groups), so the tokens since the last multiple of that are float;
      with residual 0 that partial group is quantized on the fly with its running min/max.
    dtype: storage dtype of float data and of the residual window.
    """

    bits: int | None = None
    dtype: str = "f32"
    axis: str = "token"
    group: int = 0
    symmetric: bool = True
    residual: int = 0

    def __post_init__(self):
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(FLOAT_DTYPES)}, got {self.dtype!r}")
        if self.bits is None:
            if self.axis != "token" or self.group or self.residual:
                raise ValueError("a float format takes no axis, group or residual")
            return
        if self.bits not in BITS:
            raise ValueError(f"bits must be None (float) or one of {BITS}, got {self.bits!r}")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")
        if not isinstance(self.group, int) or self.group < 0:
            raise ValueError(f"group must be a non-negative integer, got {self.group!r}")
        if self.axis == "channel" and self.group < 1:
            raise ValueError("group (tokens per channel group) must be positive for axis 'channel'")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"residual must be a non-negative integer, got {self.residual!r}")
        if self.axis == "channel" and self.residual % self.group:
            raise ValueError(f"residual ({self.residual}) must be a multiple of the token group "
                             f"({self.group}) for axis 'channel'")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def ring_length(self) -> int:
        """Tokens per sequence held in the float residual buffer (0 = none)."""
        if not self.quantized:
            return 0
        if self.axis == "channel":
            return max(self.residual, self.group)
        return self.residual

    def spec(self, head_dim: int) -> QuantSpec:
        """The core QuantSpec that quantizes along the group axis."""
        return QuantSpec(kind="int", bits=self.bits, symmetric=self.symmetric, granularity="group",
                         group_size=self.channel_group(head_dim) if self.axis == "token" else self.group)

    def channel_group(self, head_dim: int) -> int:
        """Channels per scale for axis "token" (group 0, or one as wide as the head or wider,
        means the whole head: a 16-channel head keeps one scale under the default groups of 32)."""
        return head_dim if not self.group or self.group >= head_dim else self.group

    def code_width(self, head_dim: int) -> int:
        """Bytes of codes per token and KV head."""
        return head_dim * self.bits // 8

    def check(self, head_dim: int, page_size: int, name: str = "format") -> None:
        """Raise ValueError unless this format fits heads of head_dim and pages of page_size."""
        if not self.quantized:
            return
        if head_dim * self.bits % 8:
            raise ValueError(f"{name}: {self.bits}-bit codes of head_dim {head_dim} do not fill whole bytes")
        if self.axis == "token" and head_dim % self.channel_group(head_dim):
            raise ValueError(f"{name}: channel group {self.group} must divide head_dim {head_dim}")
        if self.axis == "channel" and page_size % self.group:
            raise ValueError(f"{name}: page_size {page_size} must be a multiple of the token group "
                             f"{self.group} (per-channel scales live inside a page)")

    def page_bytes(self, page_size: int, n_kv_heads: int, head_dim: int) -> int:
        """Exact bytes of one page (page_size tokens) of one layer, all KV heads."""
        if not self.quantized:
            return page_size * n_kv_heads * head_dim * jnp.dtype(FLOAT_DTYPES[self.dtype]).itemsize
        stats = 1 if self.symmetric else 2
        codes = page_size * n_kv_heads * self.code_width(head_dim)
        if self.axis == "token":
            groups = page_size * n_kv_heads * (head_dim // self.channel_group(head_dim))
        else:
            groups = page_size // self.group * n_kv_heads * head_dim
        return codes + groups * stats * STAT_BYTES

    def ring_bytes(self, n_kv_heads: int, head_dim: int) -> int:
        """Bytes of the float residual buffer of one sequence and layer."""
        itemsize = jnp.dtype(FLOAT_DTYPES[self.dtype]).itemsize
        return self.ring_length * n_kv_heads * head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """The storage of keys and values; `name` is the string it was parsed from."""

    key: TensorFormat
    value: TensorFormat
    name: str = "custom"

    @property
    def quantized(self) -> bool:
        return self.key.quantized or self.value.quantized

    @property
    def has_ring(self) -> bool:
        return bool(self.key.ring_length or self.value.ring_length)

    def check(self, head_dim: int, page_size: int) -> None:
        self.key.check(head_dim, page_size, f"layout {self.name!r} keys")
        self.value.check(head_dim, page_size, f"layout {self.name!r} values")

    def bytes_per_token(self, n_kv_heads: int, head_dim: int, page_size: int = 64) -> float:
        """Bytes per token per layer in pages (keys + values, codes + scales + zeros)."""
        return (self.key.page_bytes(page_size, n_kv_heads, head_dim)
                + self.value.page_bytes(page_size, n_kv_heads, head_dim)) / page_size

    def residual_bytes(self, n_kv_heads: int, head_dim: int) -> int:
        """Bytes per sequence per layer of the full-precision residual buffers (keys + values)."""
        return self.key.ring_bytes(n_kv_heads, head_dim) + self.value.ring_bytes(n_kv_heads, head_dim)

    def default_page_size(self) -> int:
        """16 tokens, or a multiple of the per-channel token group when there is one."""
        size = 16
        for fmt in (self.key, self.value):
            if fmt.quantized and fmt.axis == "channel":
                size = size * fmt.group // _gcd(size, fmt.group)
        return size


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def parse_layout(text: str | KVLayout) -> KVLayout:
    """Parse `NAME[:gN][:rN][:sym|:asym][:swap]`.

    NAME: f32, bf16, f16 (float); int8 (symmetric, per token in groups of 32 channels; g0 = one
    scale per token and head); int4, int2
    (asymmetric, per token in groups of 32 channels); kivi2, kivi4 (asymmetric; keys per channel
    in groups of 32 tokens, values per token in groups of 32 channels, R = 128 recent tokens in
    float). gN: the group size; rN: the residual R; swap (KIVI only): keys per token and values
    per channel (the ablation).
    """
    if isinstance(text, KVLayout):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"layout must be a non-empty string like 'int8' or 'kivi2', got {text!r}")
    name, *options = text.strip().lower().split(":")
    if name not in LAYOUT_NAMES:
        raise ValueError(f"unknown KV layout {name!r} in {text!r}; expected one of {LAYOUT_NAMES}")
    if name in FLOAT_DTYPES:
        if options:
            raise ValueError(f"float layout {name!r} takes no options, got {text!r}")
        fmt = TensorFormat(dtype=name)
        return KVLayout(fmt, fmt, text)
    kivi = name.startswith("kivi")
    bits = int(name[-1])
    group, residual, symmetric, swap = None, None, None, False
    for option in options:
        if m := re.fullmatch(r"g(\d+)", option):
            group = int(m.group(1))
        elif m := re.fullmatch(r"r(\d+)", option):
            residual = int(m.group(1))
        elif option in ("sym", "asym"):
            symmetric = option == "sym"
        elif option == "swap" and kivi:
            swap = True
        else:
            allowed = "gN, rN, sym, asym" + (", swap" if kivi else "")
            raise ValueError(f"unknown option {option!r} in layout {text!r}; expected {allowed}")
    if kivi:
        group = KIVI_GROUP if group is None else group
        residual = KIVI_RESIDUAL if residual is None else residual
        symmetric = False if symmetric is None else symmetric
        per_channel = TensorFormat(bits=bits, axis="channel", group=group, symmetric=symmetric,
                                   residual=residual)
        per_token = TensorFormat(bits=bits, axis="token", group=group, symmetric=symmetric,
                                 residual=residual)
        key, value = (per_token, per_channel) if swap else (per_channel, per_token)
        return KVLayout(key, value, text)
    if bits == 8:  # groups of 32 like llama.cpp's q8_0 (benchmarks/kv_layouts.py chose it)
        group = INT8_GROUP if group is None else group
        symmetric = True if symmetric is None else symmetric
    else:
        group = KIVI_GROUP if group is None else group
        symmetric = False if symmetric is None else symmetric
    fmt = TensorFormat(bits=bits, axis="token", group=group, symmetric=symmetric,
                       residual=residual or 0)
    return KVLayout(fmt, fmt, text)


# ---- codes ---------------------------------------------------------------------------------
def code_dtype(fmt: TensorFormat):
    """Stored code dtype: int8 for symmetric 8-bit (what the decode kernel reads), else uint8."""
    return jnp.int8 if (fmt.bits == 8 and fmt.symmetric) else jnp.uint8


def _kernel_kind(fmt: TensorFormat) -> str | None:
    """"int8" / "int4" when the decode-attention pools' codec stores this format, else None (int2)."""
    return f"int{fmt.bits}" if fmt.bits in (4, 8) else None


def _pack(codes, fmt: TensorFormat):
    """Core codes (signed if symmetric) -> stored bytes packed along the last axis; int8 and int4
    through the kernels' pack_codes (one encoding for cache and kernel)."""
    kind = _kernel_kind(fmt)
    if kind is not None:
        return pack_codes(codes, kind, fmt.symmetric)
    unsigned = codes.astype(jnp.int16) + (2 ** (fmt.bits - 1) if fmt.symmetric else 0)
    return pack_int2(unsigned.astype(jnp.uint8))


def _dequantize(codes, scale, zero, fmt: TensorFormat, head_dim: int):
    """Stored bytes with per-group stats [..., n_groups] -> float32 [..., head_dim]; int8 and
    int4 through the kernels' dequantize_page_fields (one decoding for cache and kernel)."""
    kind = _kernel_kind(fmt)
    if kind is not None:
        return interleave_fields(dequantize_page_fields(codes, scale, zero, kind))
    group = head_dim // scale.shape[-1]
    u = unpack_int2(codes, head_dim).astype(jnp.float32) - (2 if fmt.symmetric else 0)
    out = u * jnp.repeat(scale.astype(jnp.float32), group, axis=-1)
    if zero is not None:
        out = out + jnp.repeat(zero.astype(jnp.float32), group, axis=-1)
    return out


def encode_tokens(x, fmt: TensorFormat):
    """Quantize x: [..., head_dim] per token (groups of channels) -> (codes, scale, zero or None)
    with codes [..., code_width] and scale/zero [..., head_dim / channel_group] in f16."""
    q = quantize(x.astype(jnp.float32), fmt.spec(x.shape[-1]), axis=x.ndim - 1)
    return _pack(q.codes, fmt), q.scale, q.zero


def decode_tokens(codes, scale, zero, fmt: TensorFormat, head_dim: int):
    """Inverse of encode_tokens: float32 [..., head_dim]."""
    return _dequantize(codes, scale, zero, fmt, head_dim)


def encode_channels(x, fmt: TensorFormat):
    """Quantize x: [..., n_tokens, n_kv_heads, head_dim] per channel over groups of fmt.group
    tokens (n_tokens a multiple of it) -> codes [..., n_tokens, n_kv, code_width] and
    scale/zero [..., n_tokens / group, n_kv, head_dim] in f16."""
    q = quantize(x.astype(jnp.float32), fmt.spec(x.shape[-1]), axis=x.ndim - 3)
    return _pack(q.codes, fmt), q.scale, q.zero


def decode_channels(codes, scale, zero, fmt: TensorFormat, head_dim: int):
    """Inverse of encode_channels: float32 [..., n_tokens, n_kv, head_dim]."""
    def expand(stat):
        return jnp.repeat(stat.astype(jnp.float32), fmt.group, axis=stat.ndim - 3)

    return _dequantize(codes, expand(scale), None if zero is None else expand(zero), fmt, head_dim)


def round_trip(x, fmt: TensorFormat):
    """x as the cache returns it once quantized: [..., n_tokens, n_kv, head_dim] (n_tokens a
    multiple of the group for axis "channel")."""
    if not fmt.quantized:
        return round_to(x, FLOAT_DTYPES[fmt.dtype])
    if fmt.axis == "token":
        return decode_tokens(*encode_tokens(x, fmt), fmt, x.shape[-1])
    return decode_channels(*encode_channels(x, fmt), fmt, x.shape[-1])


def running_group_round_trip(x, count, fmt: TensorFormat):
    """A partial per-channel group quantized on the fly: x [..., group, n_kv, head_dim] of which
    the first `count` tokens ([...] int, >= 1) are real; the scale comes from the real tokens only
    (the others are replaced by the first token before the core quantizer sees them)."""
    idx = jnp.arange(x.shape[-3])
    real = idx.reshape(-1, 1, 1) < jnp.asarray(count)[..., None, None, None]
    filled = jnp.where(real, x, jax.lax.slice_in_dim(x, 0, 1, axis=x.ndim - 3))
    return round_trip(filled, fmt)
