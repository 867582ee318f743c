"""Pure-jnp paged decode attention: gather each sequence's pages, dequantize, masked softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowbit.kernels.decode_attention.pages import QuantizedPagePool, dequantize_page_fields, interleave_fields


def gather_pages(pages, block_tables) -> jax.Array:
    """pages: float [P, ps, Hkv, D] or a QuantizedPagePool; block_tables [B, W] -> f32 [B, W*ps, Hkv, D]."""
    if isinstance(pages, QuantizedPagePool):
        zero = None if pages.zero is None else pages.zero[block_tables]
        fields = dequantize_page_fields(pages.codes[block_tables], pages.scale[block_tables], zero, pages.kind)
        dense = interleave_fields(fields)
    else:
        dense = pages[block_tables].astype(jnp.float32)
    b, w, ps, h, d = dense.shape
    return dense.reshape(b, w * ps, h, d)


def decode_attention_reference(q, k_pages, v_pages, block_tables, lengths, softmax_scale: float):
    """q: [B, H, D]; pages [P, ps, Hkv, D] (float or QuantizedPagePool); block_tables: int32 [B, W];
    lengths: int32 [B] -> [B, H, D] in q's dtype. Query head h reads kv head h // (H // Hkv)."""
    b, n_heads, d = q.shape
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    n_kv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, n_kv, n_heads // n_kv, d)
    logits = jnp.einsum("bhgd,bshd->bhgs", qg, k, precision=jax.lax.Precision.HIGHEST) * softmax_scale
    valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    weights = jnp.where(valid[:, None, None, :], weights, 0.0)  # rows with length 0 give 0, not NaN
    out = jnp.einsum("bhgs,bshd->bhgd", weights, v, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, n_heads, d).astype(q.dtype)
