"""Native CPU decode attention through the XLA FFI: f32, f16 or bf16 pages read in place through the
block tables (no gathered or converted copy); each task is one KV head's query group over a range of
positions (a head's positions are cut into pieces when there are fewer heads than twice the threads),
on XLA's intra-op threads, the pieces' softmaxes merged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def decode_attention_native(q, k_pages, v_pages, block_tables, lengths, softmax_scale: float, layer: int = 0):
    """q: [B, H, D]; k_pages, v_pages: [L, P, ps, Hkv, D] of one float dtype (layer `layer` is read);
    block_tables: [B, W]; lengths: [B] -> f32 [B, H, D]. Exact softmax over each sequence's first
    `length` positions (per piece: scores, then weights times values; pieces merged by their maxima
    and sums), in f32."""
    call = jax.ffi.ffi_call("lowbit_decode_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q.astype(jnp.float32), k_pages, v_pages, block_tables.astype(jnp.int32),
                lengths.astype(jnp.int32), layer=np.int64(layer), scale=np.float32(softmax_scale))
