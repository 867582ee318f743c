"""`decode_attention`: one query token per sequence against a paged, optionally quantized KV cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.kernels.decode_attention.native import decode_attention_native
from lowbit.kernels.decode_attention.pages import QuantizedPagePool
from lowbit.kernels.decode_attention.pallas import (
    DEFAULT_CONFIG,
    DecodeAttentionConfig,
    decode_attention_pallas,
    plan_decode,
)
from lowbit.kernels.decode_attention.reference import decode_attention_reference
from lowbit.kernels.dispatch import is_concrete, resolve_impl

QUERY_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_reference_jit = jax.jit(decode_attention_reference, static_argnames=("softmax_scale",))


MIN_BUCKET_PAGES = 8


def width_buckets(width: int, minimum: int = MIN_BUCKET_PAGES) -> list[int]:
    """Table widths an XLA decode step is compiled for: minimum, 2 * minimum, ... below width,
    then width itself."""
    buckets = []
    size = minimum
    while size < width:
        buckets.append(size)
        size *= 2
    return buckets + [width]


def filled_pages_only(attend, tables, lengths, page_size: int):
    """attend(tables[:, :n]) for the smallest bucket width n that holds every sequence's filled
    pages, so that the XLA path reads the filled length (within 2x), not the whole table width.
    Under jit every bucket is compiled once and lax.switch runs one of them; lengths: [B] int."""
    width = tables.shape[1]
    buckets = width_buckets(width)
    if len(buckets) == 1:
        return attend(tables)
    needed = (jnp.max(lengths) + page_size - 1) // page_size
    if is_concrete(needed):
        n = next(b for b in buckets if b >= int(needed))
        return attend(tables[:, :n])
    index = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), needed.astype(jnp.int32))
    branches = [lambda t, n=n: attend(t[:, :n]) for n in buckets]
    return jax.lax.switch(jnp.minimum(index, len(buckets) - 1), branches, tables)


def _pool_shape(pages, name: str, layer: int | None) -> tuple[int, int, int, int]:
    if isinstance(pages, QuantizedPagePool):
        if layer is not None:
            raise ValueError(f"{name}: layer= selects a layer of stacked float pages; pass a quantized "
                             "pool one layer at a time")
        pages.validate(name)
        return pages.shape
    if not hasattr(pages, "shape") or not hasattr(pages, "dtype"):
        raise ValueError(f"{name} must be a float array or a QuantizedPagePool, got {type(pages).__name__}")
    if layer is not None:
        if pages.ndim != 5:
            raise ValueError(f"{name} with layer= must be [layers, num_pages, page_size, n_kv_heads, "
                             f"head_dim], got shape {tuple(pages.shape)}")
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < pages.shape[0]:
            raise ValueError(f"layer must be an integer in 0..{pages.shape[0] - 1}, got {layer!r}")
        shape = tuple(pages.shape[1:])
    elif pages.ndim != 4:
        raise ValueError(f"{name} must be [num_pages, page_size, n_kv_heads, head_dim], got shape {tuple(pages.shape)}")
    else:
        shape = tuple(pages.shape)
    if not jnp.issubdtype(pages.dtype, jnp.floating):
        raise ValueError(f"{name} must be float pages (or a QuantizedPagePool for int8/int4), got dtype {pages.dtype}")
    return shape


def decode_attention(
    q,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    *,
    softmax_scale: float | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
    config: DecodeAttentionConfig | None = None,
    layer: int | None = None,
):
    """Attention of one new token per sequence over its cached keys and values.

    q: [B, n_heads, head_dim]. k_pages, v_pages: float [num_pages, page_size, n_kv_heads, head_dim]
    (f32/bf16/f16) or QuantizedPagePool (int8, or int4 packed along head_dim; symmetric or with
    zeros). block_tables: int [B, max_pages], page ids of each sequence in order (entries past a
    sequence's length are ignored). lengths: int [B], each in 1..max_pages * page_size.
    GQA: n_heads = group * n_kv_heads, query head h reads kv head h // group.
    softmax_scale: default 1 / sqrt(head_dim). Returns [B, n_heads, head_dim] in q's dtype.
    layer: when given, k_pages and v_pages are float stacks [layers, num_pages, ...] (a KV cache's
    storage) and this layer is read; the native kernel reads it in place, the others slice it.
    impl: "auto" (Pallas on GPU; on CPU the native kernel for float pages where it is built, else
    XLA), "pallas", "native" (float pages only, read as they are stored: f32, f16 or bf16) or "xla".
    """
    if not hasattr(q, "shape") or q.ndim != 3:
        raise ValueError(f"q must be [batch, n_heads, head_dim], got {getattr(q, 'shape', type(q).__name__)}")
    if jnp.dtype(q.dtype) not in [jnp.dtype(d) for d in QUERY_DTYPES]:
        raise ValueError(f"q must be float32, bfloat16 or float16, got dtype {q.dtype}")
    batch, n_heads, head_dim = q.shape
    k_shape = _pool_shape(k_pages, "k_pages", layer)
    v_shape = _pool_shape(v_pages, "v_pages", layer)
    if k_shape != v_shape:
        raise ValueError(f"k_pages and v_pages must have the same logical shape, got {k_shape} and {v_shape}")
    num_pages, page_size, n_kv, kv_dim = k_shape
    if kv_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but k_pages/v_pages have head_dim {kv_dim}")
    if n_heads % n_kv:
        raise ValueError(f"q: n_heads {n_heads} must be a multiple of n_kv_heads {n_kv} (GQA)")
    if not hasattr(block_tables, "shape") or block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_pages], got {getattr(block_tables, 'shape', None)}")
    if not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must hold integer page ids, got dtype {block_tables.dtype}")
    if not hasattr(lengths, "shape") or tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must be [batch={batch}], got {getattr(lengths, 'shape', None)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}")
    max_pages = block_tables.shape[1]
    capacity = max_pages * page_size
    if is_concrete(lengths):
        lens = np.asarray(lengths)
        if lens.size and (lens.min() < 1 or lens.max() > capacity):
            raise ValueError(f"lengths must lie in 1..{capacity} (max_pages * page_size), "
                             f"got min {lens.min()} max {lens.max()}")
        if is_concrete(block_tables) and lens.size:
            tables = np.asarray(block_tables)
            used = np.arange(max_pages)[None, :] < -(-lens[:, None] // page_size)
            bad = used & ((tables < 0) | (tables >= num_pages))
            if bad.any():
                raise ValueError(f"block_tables: {int(bad.sum())} entries within the sequence lengths are "
                                 f"outside 0..{num_pages - 1}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be a positive number, got {softmax_scale!r}")
    if config is not None and not isinstance(config, DecodeAttentionConfig):
        raise ValueError(f"config must be a DecodeAttentionConfig or None, got {type(config).__name__}")
    requested = impl
    impl, interpret = resolve_impl(impl, interpret, has_native=True)
    if batch == 0:
        return jnp.zeros(q.shape, q.dtype)
    if impl == "native":
        quantized = any(isinstance(p, QuantizedPagePool) for p in (k_pages, v_pages))
        if quantized and requested == "native":
            raise ValueError("impl='native' reads float pages; quantized pools run on impl='xla' or 'pallas'")
        if not quantized and (requested == "native" or k_pages.dtype == v_pages.dtype):
            if k_pages.dtype != v_pages.dtype:
                k_pages, v_pages = k_pages.astype(jnp.float32), v_pages.astype(jnp.float32)
            stacks = [p if layer is not None else p[None] for p in (k_pages, v_pages)]
            out = decode_attention_native(q, *stacks, block_tables, lengths, float(softmax_scale),
                                          0 if layer is None else int(layer))
            return out.astype(q.dtype)
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    plan = None
    if impl == "pallas":
        fields = [p.fields if isinstance(p, QuantizedPagePool) else 1 for p in (k_pages, v_pages)]
        try:
            plan = plan_decode(batch, n_heads, n_kv, head_dim, page_size, max_pages, *fields,
                               config or DEFAULT_CONFIG, interpret=interpret)
        except ValueError:
            if requested != "auto":  # "auto" falls back to XLA for shapes the kernel cannot tile
                raise
    if plan is None:
        tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1)
        return filled_pages_only(
            lambda t: _reference_jit(q, k_pages, v_pages, t, lengths.astype(jnp.int32),
                                     softmax_scale=float(softmax_scale)),
            tables, lengths, page_size)
    return decode_attention_pallas(q, k_pages, v_pages, block_tables, lengths, softmax_scale=float(softmax_scale),
                                   plan=plan, interpret=interpret)
