"""Attention through a KV cache for one layer: store the new keys/values where the layout and the
policy put them, then attend (via the decode_attention kernel API when it can read the cache); and
the cache views (decode step, prefill chunk) that the model's attention calls layer by layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowbit.kernels.decode_attention import QuantizedPagePool, decode_attention
from lowbit.kernels.decode_attention.api import filled_pages_only
from lowbit.kvcache.policy import FullPolicy, H2OPolicy, WindowPolicy
from lowbit.kvcache.store import (
    CacheSpec,
    from_storage,
    read_layer,
    read_ring,
    write_channel_groups,
    write_ring,
    write_tokens,
)

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def window_slot(positions, policy: WindowPolicy):
    """Logical slot of each position under a (sinks +) window policy (traceable)."""
    wrapped = policy.sinks + (positions - policy.sinks) % policy.window
    return jnp.where(positions < policy.capacity, positions, wrapped)


def attend(q, k, v, valid, q_sink=None, sinks: int = 0):
    """Grouped attention of one query per row. q: [S, H, hd] (after RoPE, unscaled); k, v:
    [S, T, n_kv, hd]; valid: [S, T] or [S, T, n_kv] (True = may attend). q_sink (optional, same
    shape as q) replaces q for the first `sinks` slots. Returns (out [S, H, hd] f32,
    probs [S, n_kv, group, T])."""
    s, h, d = q.shape
    n_kv = k.shape[2]
    scale = d ** -0.5
    qg = q.astype(jnp.float32).reshape(s, n_kv, h // n_kv, d) * scale
    logits = jnp.einsum("skgd,stkd->skgt", qg, k)
    if q_sink is not None and sinks:
        qs = q_sink.astype(jnp.float32).reshape(s, n_kv, h // n_kv, d) * scale
        sink_logits = jnp.einsum("skgd,stkd->skgt", qs, k[:, :sinks])
        logits = logits.at[..., :sinks].set(sink_logits)
    mask = valid[:, None, None, :] if valid.ndim == 2 else valid.transpose(0, 2, 1)[:, :, None, :]
    logits = jnp.where(mask, logits, NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("skgt,stkd->skgd", probs, v)
    return out.reshape(s, h, d), probs


# Float storage the decode attention reads as a whole stack (bf16 is stored as uint16 and bitcast,
# which XLA would do over the whole stack: it takes the per-layer path).
IN_PLACE_DTYPES = ("f32", "f16")


def _pool(part: dict, fmt, layer: int):
    if not fmt.quantized:
        return from_storage(part["data"][layer], fmt)
    zero = part["zero"][layer] if "zero" in part else None
    return QuantizedPagePool(part["codes"][layer], part["scale"][layer], zero, f"int{fmt.bits}")


def _h2o_place(state: dict, spec: CacheSpec, layer: int, positions, active):
    """Pick the slot of each new token under H2O: the next empty slot while the cache fills, then
    per KV head the slot with the lowest accumulated attention outside the recent window."""
    policy = spec.policy
    slot_pos = state["slot_pos"][layer]  # [S, C, n_kv]
    score = state["score"][layer]
    candidate = (slot_pos >= 0) & (slot_pos <= positions[:, None, None] - policy.recent)
    victim = jnp.argmin(jnp.where(candidate, score, jnp.inf), axis=1)  # [S, n_kv]
    filling = positions < spec.capacity
    logical = jnp.where(filling[:, None], positions[:, None], victim)
    logical = jnp.where(active[:, None], logical, -1)
    rows = jnp.arange(positions.shape[0])[:, None]
    heads = jnp.arange(spec.n_kv_heads)[None, :]
    target = jnp.where(logical >= 0, logical, spec.capacity)
    state = dict(state)
    state["slot_pos"] = state["slot_pos"].at[layer, rows, target, heads].set(
        jnp.broadcast_to(positions[:, None], target.shape), mode="drop")
    state["score"] = state["score"].at[layer, rows, target, heads].set(0.0, mode="drop")
    return logical, state


def decode_layer(state: dict, spec: CacheSpec, layer: int, q, k, v, positions, active, tables,
                 q_sink=None):
    """One decode step of one layer for every sequence slot.

    q: [S, H, hd] at `positions` [S] (after RoPE); k, v: [S, n_kv, hd] of the new tokens (keys after
    RoPE); active: [S] bool (inactive rows write nothing); tables: [S, W] page ids. q_sink: the
    query rotated at the re-assigned position min(p, capacity - 1) (sinks policy only).
    Returns (attention output [S, H, hd] f32, state).
    """
    policy = spec.policy
    s = q.shape[0]
    rows = jnp.arange(s)
    state = dict(state)
    if isinstance(policy, H2OPolicy):
        logical, state = _h2o_place(state, spec, layer, positions, active)
    else:
        slot = window_slot(positions, policy) if isinstance(policy, WindowPolicy) else positions
        logical = jnp.broadcast_to(jnp.where(active, slot, -1)[:, None], (s, spec.n_kv_heads))
    for name, x in (("k", k), ("v", v)):
        fmt = spec.fmt(name)
        part = state[name]
        ring = fmt.ring_length
        if not ring:
            part = write_tokens(part, fmt, layer, tables, logical[:, None], x[:, None], spec)
        elif fmt.axis == "token":
            index = positions % ring
            old = read_ring(part, fmt, layer)[rows, index]
            leaving = jnp.where(active & (positions >= ring), positions - ring, -1)
            leaving = jnp.broadcast_to(leaving[:, None, None], (s, 1, spec.n_kv_heads))
            part = write_tokens(part, fmt, layer, tables, leaving, old[:, None], spec)
            part = write_ring(part, fmt, layer, rows, jnp.where(active, index, ring), x)
        else:
            flush = active & (positions % ring == 0) & (positions > 0)

            def do_flush(p, fmt=fmt, ring=ring, flush=flush):
                count = jnp.where(flush, ring, 0)
                return write_channel_groups(p, fmt, layer, tables, positions - ring, count,
                                            read_ring(p, fmt, layer), spec)

            part = jax.lax.cond(flush.any(), do_flush, lambda p: p, part)
            part = write_ring(part, fmt, layer, rows, jnp.where(active, positions % ring, ring), x)
        state[name] = part

    if spec.kernel_compatible:
        lengths = positions + 1
        if isinstance(policy, WindowPolicy):
            lengths = jnp.minimum(lengths, policy.capacity)
        lengths = jnp.maximum(lengths, 1).astype(jnp.int32)
        if all(spec.fmt(n).dtype in IN_PLACE_DTYPES and not spec.fmt(n).quantized for n in ("k", "v")):
            # the whole stacks and the layer: the native kernel reads them in place
            out = decode_attention(q.astype(jnp.float32), state["k"]["data"], state["v"]["data"], tables,
                                   lengths, layer=layer)
        else:
            out = decode_attention(q.astype(jnp.float32), _pool(state["k"], spec.fmt("k"), layer),
                                   _pool(state["v"], spec.fmt("v"), layer), tables, lengths)
        return out.astype(jnp.float32), state

    if isinstance(policy, FullPolicy):  # read only the filled pages (the widest row decides)
        def attend_pages(t_tables):
            keys = read_layer(state, spec, "k", layer, t_tables, positions)
            values = read_layer(state, spec, "v", layer, t_tables, positions)
            valid = jnp.arange(keys.shape[1])[None, :] <= positions[:, None]
            return attend(q, keys, values, valid)[0]

        return filled_pages_only(attend_pages, tables, positions + 1, spec.page_size), state
    keys = read_layer(state, spec, "k", layer, tables, positions)
    values = read_layer(state, spec, "v", layer, tables, positions)
    t = keys.shape[1]
    idx = jnp.arange(t)
    if isinstance(policy, H2OPolicy):
        held = state["slot_pos"][layer] >= 0  # [S, C, n_kv]
        valid = jnp.pad(held, ((0, 0), (0, t - spec.capacity), (0, 0)))
    elif isinstance(policy, WindowPolicy):
        valid = idx[None, :] < jnp.minimum(positions + 1, policy.capacity)[:, None]
    else:
        valid = idx[None, :] <= positions[:, None]
    sinks = policy.sinks if isinstance(policy, WindowPolicy) else 0
    out, probs = attend(q, keys, values, valid, q_sink, sinks)
    if isinstance(policy, H2OPolicy):
        gained = probs.sum(axis=2)[..., :spec.capacity].transpose(0, 2, 1)  # [S, C, n_kv]
        state["score"] = state["score"].at[layer].add(jnp.where(active[:, None, None], gained, 0.0))
    return out, state


def prefill_layer(state: dict, spec: CacheSpec, layer: int, slot, table_row, q, k, v, start,
                  real_len, has_prefix: bool):
    """A prompt chunk of one sequence through one layer: causal attention over the cached prefix
    (positions < start, as stored) and the chunk itself in full precision; then the chunk's keys and
    values are stored as the layout and the policy say.

    q: [n, H, hd]; k, v: [n, n_kv, hd] at positions start .. start + n - 1 (after RoPE), of which the
    first real_len are real (the rest is padding). slot: the sequence's row; table_row: [W].
    Returns (attention output [n, H, hd] f32, state).
    """
    policy = spec.policy
    n, h, d = q.shape
    n_kv = k.shape[1]
    g = h // n_kv
    positions = start + jnp.arange(n)
    real = jnp.arange(n) < real_len
    end = start + real_len
    qg = q.astype(jnp.float32).reshape(n, n_kv, g, d) * d ** -0.5
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    logits = jnp.einsum("qkgd,tkd->kgqt", qg, kf)
    causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
    logits = jnp.where(causal, logits, NEG)
    tables = table_row[None]
    if has_prefix:
        prefix_k = read_layer(state, spec, "k", layer, tables, start[None] - 1)[0]
        prefix_v = read_layer(state, spec, "v", layer, tables, start[None] - 1)[0]
        prefix_logits = jnp.einsum("qkgd,tkd->kgqt", qg, prefix_k)
        before = jnp.arange(prefix_k.shape[0]) < start
        prefix_logits = jnp.where(before, prefix_logits, NEG)
        probs = jax.nn.softmax(jnp.concatenate([prefix_logits, logits], axis=-1), axis=-1)
        prefix_probs, probs = probs[..., :prefix_k.shape[0]], probs[..., prefix_k.shape[0]:]
        out = jnp.einsum("kgqt,tkd->qkgd", prefix_probs, prefix_v)
        out = out + jnp.einsum("kgqt,tkd->qkgd", probs, vf)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("kgqt,tkd->qkgd", probs, vf)
    out = out.reshape(n, h, d)

    state = dict(state)
    if isinstance(policy, H2OPolicy):
        scores = jnp.where(real[None, :, None], probs.sum(axis=1), 0.0).sum(axis=1)  # [n_kv, n]
        logical, state = _h2o_prefill_place(state, spec, layer, slot, positions, real, end, scores)
    elif isinstance(policy, WindowPolicy):
        kept = real & ((positions < policy.sinks) | (positions >= end - policy.window))
        logical = jnp.where(kept, window_slot(positions, policy), -1)
        logical = jnp.broadcast_to(logical[:, None], (n, n_kv))
    else:
        logical = jnp.broadcast_to(jnp.where(real, positions, -1)[:, None], (n, n_kv))
    rows = jnp.full((n,), slot)
    for name, x in (("k", k), ("v", v)):
        fmt = spec.fmt(name)
        part = state[name]
        ring = fmt.ring_length
        if not ring:
            part = write_tokens(part, fmt, layer, tables, logical[None], x[None], spec)
        elif fmt.axis == "token":
            paged = jnp.where(real & (positions < end - ring), positions, -1)
            paged = jnp.broadcast_to(paged[:, None], (n, n_kv))
            part = write_tokens(part, fmt, layer, tables, paged[None], x[None], spec)
            in_ring = real & (positions >= end - ring)
            part = write_ring(part, fmt, layer, rows, jnp.where(in_ring, positions % ring, ring), x)
        else:
            boundary = end // ring * ring
            count = jnp.clip(boundary - start, 0, n)
            part = write_channel_groups(part, fmt, layer, tables, start[None], count[None], x[None], spec)
            in_ring = real & (positions >= boundary)
            part = write_ring(part, fmt, layer, rows, jnp.where(in_ring, positions % ring, ring), x)
        state[name] = part
    return out, state


def _h2o_prefill_place(state, spec: CacheSpec, layer, slot, positions, real, end, scores):
    """Slots for a prompt under H2O: all tokens while they fit; otherwise per KV head the `heavy`
    tokens with the most accumulated attention before the recent window, then the recent ones."""
    policy = spec.policy
    n = positions.shape[0]
    n_kv, cap = spec.n_kv_heads, spec.capacity
    fits = jnp.broadcast_to(jnp.where(real & (positions < cap), positions, -1)[:, None], (n, n_kv))
    held_pos = jnp.where(jnp.arange(cap) < end, jnp.arange(cap), -1)
    fit_pos = jnp.broadcast_to(held_pos[:, None], (cap, n_kv))
    fit_score = jnp.pad(scores, ((0, 0), (0, max(0, cap - n))))[:, :cap].T
    fit_score = jnp.where(fit_pos >= 0, fit_score, 0.0)
    if n <= cap:
        logical, slot_pos, slot_score = fits, fit_pos, fit_score
    else:
        heads = jnp.arange(n_kv)
        candidate = real[None, :] & (positions[None, :] < end - policy.recent)
        _, heavy_idx = jax.lax.top_k(jnp.where(candidate, scores, -jnp.inf), policy.heavy)  # [n_kv, heavy]
        recent_idx = (end - policy.recent - positions[0]) + jnp.arange(policy.recent)  # [recent]
        chosen = jnp.concatenate([heavy_idx, jnp.broadcast_to(recent_idx, (n_kv, policy.recent))], axis=1)
        chosen = jnp.clip(chosen, 0, n - 1)  # [n_kv, C] chunk indices held by slots 0..C-1
        picked = jnp.full((n, n_kv), -1, jnp.int32).at[chosen, heads[:, None]].set(
            jnp.broadcast_to(jnp.arange(cap), (n_kv, cap)))
        over = end > cap
        logical = jnp.where(over, picked, fits)
        slot_pos = jnp.where(over, positions[chosen].T, fit_pos)
        slot_score = jnp.where(over, jnp.take_along_axis(scores, chosen, axis=1).T, fit_score)
    state = dict(state)
    state["slot_pos"] = state["slot_pos"].at[layer, slot].set(slot_pos)
    state["score"] = state["score"].at[layer, slot].set(slot_score)
    return logical, state



@dataclasses.dataclass(frozen=True)
class DecodeView:
    """A cache's storage for one decode step of every sequence slot, as the model's attention takes
    it (lowbit.models.llama.AttentionCache): one new token per slot at `positions` [S]; active [S]
    (inactive slots write nothing); tables [S, W] page ids. Any layout and policy of `spec`."""

    state: dict
    spec: CacheSpec
    positions: jax.Array
    active: jax.Array
    tables: jax.Array

    def attend(self, layer: int, q, k, v, rotate_query):
        """q: [S, 1, H, hd], k, v: [S, 1, n_kv, hd] -> ([S, 1, H, hd] f32, the updated view)."""
        policy = self.spec.policy
        q_sink = None
        if isinstance(policy, WindowPolicy) and policy.sinks:
            q_sink = rotate_query(jnp.minimum(self.positions, policy.capacity - 1)[:, None])[:, 0]
        out, state = decode_layer(self.state, self.spec, layer, q[:, 0], k[:, 0], v[:, 0], self.positions,
                                  self.active, self.tables, q_sink)
        return out[:, None], dataclasses.replace(self, state=state)


@dataclasses.dataclass(frozen=True)
class PrefillView:
    """A cache's storage for one prompt chunk of the sequence in `slot` (the model's
    AttentionCache): chunk tokens at positions start.., of which the first real_len are real;
    table_row [W]; has_prefix: the slot already holds positions < start (attended as stored)."""

    state: dict
    spec: CacheSpec
    start: jax.Array
    real_len: jax.Array
    slot: jax.Array
    table_row: jax.Array
    has_prefix: bool

    def attend(self, layer: int, q, k, v, rotate_query):
        """q: [1, n, H, hd], k, v: [1, n, n_kv, hd] -> ([1, n, H, hd] f32, the updated view)."""
        out, state = prefill_layer(self.state, self.spec, layer, self.slot, self.table_row, q[0], k[0], v[0],
                                   self.start, self.real_len, self.has_prefix)
        return out[None], dataclasses.replace(self, state=state)
