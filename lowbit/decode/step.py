"""The model's work per step over a KV cache, built from a Llama's block submodules: prefill one
prompt chunk into a sequence slot, or decode one token for every slot at once (fixed shapes, so
each compiles once per cache spec).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.kvcache.attention import decode_layer, prefill_layer
from lowbit.kvcache.policy import WindowPolicy
from lowbit.kvcache.store import CacheSpec
from lowbit.models.llama import apply_rope, rope_angles


def _project(block, config, x, positions):
    """x: [B, n, d], positions [B, n] -> (q before RoPE, q, k after RoPE, v); heads split."""
    b, n, _ = x.shape
    h = block.attn_norm(x)
    q = block.attn.wq(h).reshape(b, n, config.n_heads, config.head_dim)
    k = block.attn.wk(h).reshape(b, n, config.n_kv_heads, config.head_dim)
    v = block.attn.wv(h).reshape(b, n, config.n_kv_heads, config.head_dim)
    cos, sin = rope_angles(positions, config.head_dim, config.rope_base)
    return (q, apply_rope(q, cos, sin, config.rope_layout),
            apply_rope(k, cos, sin, config.rope_layout), v)


def _finish_block(block, x, attended):
    """Output projection, residual, then the MLP half of the block. attended: [B, n, H*hd]."""
    hidden = x + block.attn.wo(attended.astype(x.dtype))
    return hidden + block.mlp(block.ffn_norm(hidden))


def decode_forward(model, cache_state: dict, spec: CacheSpec, tokens, positions, active, tables):
    """One token per slot. tokens, positions: [S] int32; active: [S] bool; tables: [S, W].
    Returns (logits [S, vocab] f32, cache_state)."""
    config = model.config
    s = tokens.shape[0]
    x = model.embed_tokens(tokens[:, None])
    policy = spec.policy
    sink_positions = None
    if isinstance(policy, WindowPolicy) and policy.sinks:
        sink_positions = jnp.minimum(positions, policy.capacity - 1)[:, None]
    for layer, block in enumerate(model.layers):
        q_raw, q, k, v = _project(block, config, x, positions[:, None])
        q_sink = None
        if sink_positions is not None:
            cos, sin = rope_angles(sink_positions, config.head_dim, config.rope_base)
            q_sink = apply_rope(q_raw, cos, sin, config.rope_layout)[:, 0]
        out, cache_state = decode_layer(cache_state, spec, layer, q[:, 0], k[:, 0], v[:, 0],
                                        positions, active, tables, q_sink)
        x = _finish_block(block, x, out.reshape(s, 1, -1))
    return model.head(x)[:, 0], cache_state


def prefill_forward(model, cache_state: dict, spec: CacheSpec, tokens, start, real_len, slot,
                    table_row, has_prefix: bool):
    """A prompt chunk tokens: [n] (the first real_len real) at positions start.. of sequence `slot`.
    Returns (logits of the last real token [vocab] f32, cache_state)."""
    config = model.config
    n = tokens.shape[0]
    positions = (start + jnp.arange(n, dtype=jnp.int32))[None]
    x = model.embed_tokens(tokens[None])
    for layer, block in enumerate(model.layers):
        _, q, k, v = _project(block, config, x, positions)
        out, cache_state = prefill_layer(cache_state, spec, layer, slot, table_row, q[0], k[0], v[0],
                                         start, real_len, has_prefix)
        x = _finish_block(block, x, out.reshape(1, n, -1))
    last = jax.lax.dynamic_slice_in_dim(x, real_len - 1, 1, axis=1)
    return model.head(last)[0, 0], cache_state


def select_tokens(logits, temperature, key_data, counters):
    """Next token per row: argmax where temperature is 0, else a sample from softmax(logits / T)
    with key fold_in(wrap_key_data(key_data[i]), counters[i]). logits [S, V] -> int32 [S]."""
    def one(row, temp, data, counter):
        key = jax.random.fold_in(jax.random.wrap_key_data(data), counter)
        sampled = jax.random.categorical(key, row / jnp.maximum(temp, 1e-6))
        return jnp.where(temp > 0, sampled, jnp.argmax(row)).astype(jnp.int32)

    return jax.vmap(one)(logits, temperature, key_data, counters)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "return_logits"), donate_argnames=("cache_state",))
def decode_step(graphdef, params, cache_state, spec, tokens, positions, active, tables, temperature,
                key_data, counters, return_logits=False):
    """Jitted decode of one token for every slot, then token selection. Returns (next tokens [S],
    logits [S, V] or None, cache_state); the input cache_state is donated."""
    model = nnx.merge(graphdef, params)
    logits, cache_state = decode_forward(model, cache_state, spec, tokens, positions, active, tables)
    chosen = select_tokens(logits, temperature, key_data, counters)
    return chosen, (logits if return_logits else None), cache_state


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "has_prefix", "return_logits"),
                   donate_argnames=("cache_state",))
def prefill_step(graphdef, params, cache_state, spec, tokens, start, real_len, slot, table_row,
                 temperature, key_data, counter, has_prefix=False, return_logits=False):
    """Jitted prefill of one chunk into one slot, then selection of the next token. Returns
    (token, logits [V] or None, cache_state); the input cache_state is donated."""
    model = nnx.merge(graphdef, params)
    logits, cache_state = prefill_forward(model, cache_state, spec, tokens, start, real_len, slot,
                                          table_row, has_prefix)
    chosen = select_tokens(logits[None], temperature[None], key_data[None], counter[None])[0]
    return chosen, (logits if return_logits else None), cache_state
