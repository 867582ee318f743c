"""The model's work per step over a KV cache, through its own blocks and a cache view: prefill one
prompt chunk into a sequence slot, or decode one token for every slot at once, or several such
steps in one call (fixed shapes, so each compiles once per cache spec).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.decode.compilation import StoredJit
from lowbit.kvcache.attention import DecodeView, PrefillView
from lowbit.kvcache.store import CacheSpec

# Decode steps one decode_steps call may run: each call costs a dispatch of every parameter buffer
# (about 2 ms for SmolLM2-135M's 500 on this CPU), which running them on device pays once.
MAX_DECODE_STEPS = 16


def decode_forward(model, cache_state: dict, spec: CacheSpec, tokens, positions, active, tables):
    """One token per slot. tokens, positions: [S] int32; active: [S] bool; tables: [S, W].
    Returns (logits [S, vocab] f32, cache_state)."""
    view = DecodeView(cache_state, spec, positions, active, tables)
    x, view = model.run_blocks(model.embed_tokens(tokens[:, None]), positions[:, None], view)
    return model.head(x)[:, 0], view.state


def prefill_forward(model, cache_state: dict, spec: CacheSpec, tokens, start, real_len, slot,
                    table_row, has_prefix: bool):
    """A prompt chunk tokens: [n] (the first real_len real) at positions start.. of sequence `slot`.
    Returns (logits of the last real token [vocab] f32, cache_state)."""
    positions = (start + jnp.arange(tokens.shape[0], dtype=jnp.int32))[None]
    view = PrefillView(cache_state, spec, start, real_len, slot, table_row, has_prefix)
    x, view = model.run_blocks(model.embed_tokens(tokens[None]), positions, view)
    last = jax.lax.dynamic_slice_in_dim(x, real_len - 1, 1, axis=1)
    return model.head(last)[0, 0], view.state


def select_tokens(logits, temperature, key_data, counters):
    """Next token per row: argmax where temperature is 0, else a sample from softmax(logits / T)
    with key fold_in(wrap_key_data(key_data[i]), counters[i]). logits [S, V] -> int32 [S]. The
    sampling (random numbers for every vocabulary entry: 1.2 ms of a SmolLM2 decode step on CPU)
    runs only when some row has a temperature."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(row, temp, data, counter, best):
        key = jax.random.fold_in(jax.random.wrap_key_data(data), counter)
        sampled = jax.random.categorical(key, row / jnp.maximum(temp, 1e-6))
        return jnp.where(temp > 0, sampled, best).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0),
                        lambda: jax.vmap(one)(logits, temperature, key_data, counters, greedy), lambda: greedy)


def _decode_step(graphdef, params, cache_state, spec, tokens, positions, active, tables, temperature,
                 key_data, counters, return_logits=False):
    """Jitted decode of one token for every slot, then token selection. Returns (next tokens [S],
    logits [S, V] or None, cache_state); the input cache_state is donated."""
    model = nnx.merge(graphdef, params)
    logits, cache_state = decode_forward(model, cache_state, spec, tokens, positions, active, tables)
    chosen = select_tokens(logits, temperature, key_data, counters)
    return chosen, (logits if return_logits else None), cache_state


def _decode_steps(graphdef, params, cache_state, spec, tokens, positions, active, tables, temperature,
                  key_data, counters, steps, max_steps=MAX_DECODE_STEPS):
    """Jitted `steps` (a traced count, at most the static max_steps) decode steps in one call, each
    feeding the tokens it chose back in at the next position (what `steps` calls of _decode_step
    would do, with one dispatch). Returns (chosen [max_steps, S] int32, rows from `steps` on -1,
    cache_state); the input cache_state is donated and must hold `steps` more positions per slot."""
    model = nnx.merge(graphdef, params)
    chosen = jnp.full((max_steps, tokens.shape[0]), -1, jnp.int32)

    def step(i, carry):
        tokens, cache_state, chosen = carry
        logits, cache_state = decode_forward(model, cache_state, spec, tokens, positions + i, active, tables)
        tokens = select_tokens(logits, temperature, key_data, counters + i)
        return tokens, cache_state, chosen.at[i].set(tokens)

    _, cache_state, chosen = jax.lax.fori_loop(0, steps, step, (tokens, cache_state, chosen))
    return chosen, cache_state


def _prefill_step(graphdef, params, cache_state, spec, tokens, start, real_len, slot, table_row,
                  temperature, key_data, counter, has_prefix=False, return_logits=False):
    """Jitted prefill of one chunk into one slot, then selection of the next token. Returns
    (token, logits [V] or None, cache_state); the input cache_state is donated."""
    model = nnx.merge(graphdef, params)
    logits, cache_state = prefill_forward(model, cache_state, spec, tokens, start, real_len, slot,
                                          table_row, has_prefix)
    chosen = select_tokens(logits[None], temperature[None], key_data[None], counter[None])[0]
    return chosen, (logits if return_logits else None), cache_state


decode_step = StoredJit(_decode_step, ("graphdef", "spec", "return_logits"), ("cache_state",))
decode_steps = StoredJit(_decode_steps, ("graphdef", "spec", "max_steps"), ("cache_state",))
prefill_step = StoredJit(_prefill_step, ("graphdef", "spec", "has_prefix", "return_logits"), ("cache_state",))
