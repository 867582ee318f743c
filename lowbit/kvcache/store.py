"""Device-side KV storage: page pools (float data, or codes + scales + zeros), per-sequence float
residual buffers and H2O bookkeeping, with traceable writes and reads through block tables.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lowbit.kvcache.layout import (
    FLOAT_DTYPES,
    KVLayout,
    TensorFormat,
    code_dtype,
    decode_channels,
    decode_tokens,
    encode_channels,
    encode_tokens,
    running_group_round_trip,
)
from lowbit.kernels.decode_attention.pages import groups_supported
from lowbit.kvcache.policy import FullPolicy, H2OPolicy, Policy, WindowPolicy

TENSORS = ("k", "v")


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static description of a cache (hashable: a static jit argument).

    table_width: pages per block-table row; capacity: logical token slots per sequence
    (the policy's capacity, or table_width * page_size for the full policy).
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    slots: int
    table_width: int
    layout: KVLayout
    policy: Policy

    def __post_init__(self):
        self.layout.check(self.head_dim, self.page_size)
        if self.layout.has_ring and not isinstance(self.policy, FullPolicy):
            raise ValueError(f"layout {self.layout.name!r} keeps a full-precision residual window, "
                             f"which needs the full policy, not {self.policy}")
        if self.policy.capacity is not None and self.policy.capacity > self.table_width * self.page_size:
            raise ValueError(f"policy capacity {self.policy.capacity} exceeds table_width * page_size")

    @property
    def capacity(self) -> int:
        cap = self.policy.capacity
        return self.table_width * self.page_size if cap is None else cap

    def fmt(self, name: str) -> TensorFormat:
        return self.layout.key if name == "k" else self.layout.value

    @property
    def kernel_compatible(self) -> bool:
        """Whether the decode_attention kernel API can read this cache (lengths-only masks)."""
        if isinstance(self.policy, H2OPolicy):
            return False
        if isinstance(self.policy, WindowPolicy) and self.policy.sinks:
            return False
        return all(_kernel_format(self.fmt(n), self.head_dim) for n in TENSORS)


def _kernel_format(fmt: TensorFormat, head_dim: int) -> bool:
    """Floats, or int8/int4 per token with any channel groups the kernel's pools hold (whole
    heads, or e.g. the default int4 groups of 32)."""
    if not fmt.quantized:
        return True
    return (fmt.axis == "token" and fmt.residual == 0 and fmt.bits in (4, 8)
            and groups_supported(head_dim, head_dim // fmt.channel_group(head_dim), 2 if fmt.bits == 4 else 1))


def storage_dtype(fmt: TensorFormat):
    """dtype of stored floats: bf16 is kept as its uint16 bit pattern, because XLA:CPU scatters
    into a bf16 array by converting the whole array (a copy per write), but not into uint16."""
    return jnp.uint16 if fmt.dtype == "bf16" else FLOAT_DTYPES[fmt.dtype]


def to_storage(x, fmt: TensorFormat):
    """Float values -> what a float array of fmt stores (data or residual)."""
    x = x.astype(FLOAT_DTYPES[fmt.dtype])
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if fmt.dtype == "bf16" else x


def from_storage(x, fmt: TensorFormat):
    """Inverse of to_storage, in fmt's float dtype."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if fmt.dtype == "bf16" else x


def init_state(spec: CacheSpec) -> dict:
    """Zero-filled storage. Per tensor ("k", "v"): "data" [L, P, ps, n_kv, hd] for floats, else
    "codes" [L, P, ps, n_kv, code_width] with "scale" (and "zero" if asymmetric) of shape
    [L, P, ps, n_kv, hd / channel_group] (axis token) or [L, P, ps / group, n_kv, hd] (axis channel);
    "ring" [L, slots, ring_length, n_kv, hd] when there is a residual. H2O adds "slot_pos"
    [L, slots, capacity, n_kv] (position held by each slot, -1 when empty) and "score" (f32)."""
    L, P, ps, H, D = spec.n_layers, spec.num_pages, spec.page_size, spec.n_kv_heads, spec.head_dim
    state: dict = {}
    for name in TENSORS:
        fmt = spec.fmt(name)
        part = {}
        if not fmt.quantized:
            part["data"] = jnp.zeros((L, P, ps, H, D), storage_dtype(fmt))
        else:
            part["codes"] = jnp.zeros((L, P, ps, H, fmt.code_width(D)), code_dtype(fmt))
            if fmt.axis == "token":
                stat_shape = (L, P, ps, H, D // fmt.channel_group(D))
            else:
                stat_shape = (L, P, ps // fmt.group, H, D)
            part["scale"] = jnp.zeros(stat_shape, jnp.float16)
            if not fmt.symmetric:
                part["zero"] = jnp.zeros(stat_shape, jnp.float16)
            if fmt.ring_length:
                part["ring"] = jnp.zeros((L, spec.slots, fmt.ring_length, H, D), storage_dtype(fmt))
        state[name] = part
    if isinstance(spec.policy, H2OPolicy):
        shape = (L, spec.slots, spec.capacity, H)
        state["slot_pos"] = jnp.full(shape, -1, jnp.int32)
        state["score"] = jnp.zeros(shape, jnp.float32)
    return state


def state_nbytes(state: dict) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(state))


# ---- addressing ----------------------------------------------------------------------------
def page_address(tables, logical, spec: CacheSpec):
    """tables [S, W]; logical [S, ...] slot ids (< 0 = no write) -> (page, offset), where a page
    of num_pages (out of bounds) makes a scatter with mode="drop" skip the write."""
    s = tables.shape[0]
    flat = logical.reshape(s, -1)
    column = jnp.clip(flat // spec.page_size, 0, tables.shape[1] - 1)
    page = jnp.take_along_axis(tables, column, axis=1)
    page = jnp.where(flat >= 0, page, spec.num_pages).reshape(logical.shape)
    return page, jnp.where(logical >= 0, logical % spec.page_size, 0)


def write_tokens(part: dict, fmt: TensorFormat, layer: int, tables, logical, x, spec: CacheSpec) -> dict:
    """Store x: [S, n, n_kv, hd] at logical slots [S, n, n_kv] (per KV head; < 0 skips)."""
    page, offset = page_address(tables, logical, spec)
    heads = jnp.broadcast_to(jnp.arange(spec.n_kv_heads), logical.shape)
    index = (layer, page, offset, heads)
    part = dict(part)
    if not fmt.quantized:
        part["data"] = part["data"].at[index].set(to_storage(x, fmt), mode="drop")
        return part
    codes, scale, zero = encode_tokens(x, fmt)
    part["codes"] = part["codes"].at[index].set(codes, mode="drop")
    part["scale"] = part["scale"].at[index].set(scale, mode="drop")
    if zero is not None:
        part["zero"] = part["zero"].at[index].set(zero, mode="drop")
    return part


def write_channel_groups(part: dict, fmt: TensorFormat, layer: int, tables, start, count, x,
                         spec: CacheSpec) -> dict:
    """Quantize x: [S, n, n_kv, hd] (n a multiple of fmt.group) per channel and store its first
    count[S] tokens (a multiple of the group; 0 skips the row) at logical slots start, start + 1, ..."""
    n = x.shape[1]
    codes, scale, zero = encode_channels(x, fmt)
    i = jnp.arange(n)
    logical = jnp.where(i[None, :] < count[:, None], start[:, None] + i[None, :], -1)
    page, offset = page_address(tables, logical, spec)
    part = dict(part)
    part["codes"] = part["codes"].at[layer, page, offset].set(codes, mode="drop")
    group_logical = logical[:, ::fmt.group]
    gpage, goffset = page_address(tables, group_logical, spec)
    part["scale"] = part["scale"].at[layer, gpage, goffset // fmt.group].set(scale, mode="drop")
    if zero is not None:
        part["zero"] = part["zero"].at[layer, gpage, goffset // fmt.group].set(zero, mode="drop")
    return part


def write_ring(part: dict, fmt: TensorFormat, layer: int, rows, ring_index, x) -> dict:
    """ring[layer, rows, ring_index] = x for rows [S...] and indices (>= ring length skips)."""
    part = dict(part)
    part["ring"] = part["ring"].at[layer, rows, ring_index].set(to_storage(x, fmt), mode="drop")
    return part


def read_ring(part: dict, fmt: TensorFormat, layer: int):
    """The residual ring of one layer as float32 [slots, ring_length, n_kv, hd]."""
    return from_storage(part["ring"][layer], fmt).astype(jnp.float32)


def gather_layer(part: dict, fmt: TensorFormat, layer: int, tables, spec: CacheSpec):
    """The pages of each row of tables [S, W] as float32 [S, W * ps, n_kv, hd] (no residual)."""
    s, w = tables.shape
    t = w * spec.page_size
    D = spec.head_dim
    if not fmt.quantized:
        pages = from_storage(part["data"][layer][tables], fmt)
        return pages.astype(jnp.float32).reshape(s, t, spec.n_kv_heads, D)
    codes = part["codes"][layer][tables].reshape(s, t, spec.n_kv_heads, -1)
    scale = part["scale"][layer][tables]
    zero = part["zero"][layer][tables] if "zero" in part else None
    if fmt.axis == "token":
        scale = scale.reshape(s, t, spec.n_kv_heads, -1)
        zero = None if zero is None else zero.reshape(s, t, spec.n_kv_heads, -1)
        return decode_tokens(codes, scale, zero, fmt, D)
    groups = t // fmt.group
    scale = scale.reshape(s, groups, spec.n_kv_heads, D)
    zero = None if zero is None else zero.reshape(s, groups, spec.n_kv_heads, D)
    return decode_channels(codes, scale, zero, fmt, D)


def first_float_position(fmt: TensorFormat, positions):
    """The first position that a query at `positions` sees from the residual (float) buffer."""
    if fmt.axis == "token":
        return jnp.maximum(positions - fmt.residual + 1, 0)
    ring = fmt.ring_length
    return positions // ring * ring


def overlay_ring(dense, ring, fmt: TensorFormat, positions):
    """Replace positions [first_float, position] of dense [S, T, n_kv, hd] (logical slot = position)
    by the residual ring [S, R, n_kv, hd] (float32); with residual 0 (axis channel) the partial group is
    quantized on the fly from its real tokens."""
    t = dense.shape[1]
    length = ring.shape[1]
    first = first_float_position(fmt, positions)
    if fmt.axis == "channel" and fmt.residual == 0:
        ring = running_group_round_trip(ring, positions - first + 1, fmt)
    idx = jnp.arange(t)
    expanded = ring[:, idx % length]
    use = (idx[None, :] >= first[:, None]) & (idx[None, :] <= positions[:, None])
    return jnp.where(use[:, :, None, None], expanded, dense)


def read_layer(state: dict, spec: CacheSpec, name: str, layer: int, tables, positions):
    """Keys or values as the query at `positions` [S] sees them: float32 [S, T, n_kv, hd]."""
    fmt = spec.fmt(name)
    dense = gather_layer(state[name], fmt, layer, tables, spec)
    if fmt.ring_length:
        dense = overlay_ring(dense, read_ring(state[name], fmt, layer), fmt, positions)
    return dense


# ---- whole-page and whole-slot copies (copy on write, forks) -------------------------------
@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(state: dict, src, dst) -> dict:
    """Copy pages src -> dst ([n] each, every layer, keys and values with their scales); a dst of
    num_pages or more is skipped."""
    out = dict(state)
    for name in TENSORS:
        part = dict(state[name])
        for field in ("data", "codes", "scale", "zero"):
            if field in part:
                arr = part[field]
                part[field] = arr.at[:, dst].set(arr[:, src], mode="drop")
        out[name] = part
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def reset_slot(state: dict, slot) -> dict:
    """Forget the H2O bookkeeping of a slot (its pages and residual are simply overwritten)."""
    out = dict(state)
    if "slot_pos" in state:
        out["slot_pos"] = state["slot_pos"].at[:, slot].set(-1)
        out["score"] = state["score"].at[:, slot].set(0.0)
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_slot(state: dict, src, dst) -> dict:
    """Copy one sequence slot's residual buffers and H2O bookkeeping (scalars src -> dst)."""
    out = dict(state)
    for name in TENSORS:
        if "ring" in state[name]:
            part = dict(state[name])
            part["ring"] = part["ring"].at[:, dst].set(part["ring"][:, src])
            out[name] = part
    for field in ("slot_pos", "score"):
        if field in state:
            out[field] = state[field].at[:, dst].set(state[field][:, src])
    return out
