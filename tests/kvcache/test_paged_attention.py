"""Attention through the paged store equals dense attention for random block tables (float, and
quantized against its own round trip); re-assigned sink positions; H2O keeps what it should."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.kvcache.attention import decode_layer
from lowbit.kvcache.layout import parse_layout, round_trip
from lowbit.kvcache.policy import parse_policy
from lowbit.kvcache.store import CacheSpec, init_state, write_tokens
from lowbit.models.llama import apply_rope, rope_angles

N_KV, HEADS, HEAD_DIM, PAGE, WIDTH = 2, 4, 32, 4, 6
LENGTHS = np.array([1, 4, 13, 24])  # one token, a page boundary, mid-page, full table


def _spec(layout, policy=None, slots=len(LENGTHS), pages=30):
    return CacheSpec(1, N_KV, HEAD_DIM, PAGE, pages, slots, WIDTH, parse_layout(layout),
                     parse_policy(policy).resolve(WIDTH * PAGE))


@functools.partial(jax.jit, static_argnames=("spec",))
def _fill_and_decode(spec, k, v, q, tables, lengths):
    """Write tokens 0..length-2 of each row, then decode the last one through decode_layer."""
    state = init_state(spec)
    s, t = k.shape[:2]
    idx = jnp.arange(t)
    logical = jnp.where(idx[None, :] < lengths[:, None] - 1, idx[None, :], -1)
    logical = jnp.broadcast_to(logical[..., None], (s, t, N_KV))
    for name, x in (("k", k), ("v", v)):
        state[name] = write_tokens(state[name], spec.fmt(name), 0, tables, logical, x, spec)
    last = lengths - 1
    rows = jnp.arange(s)
    out, _ = decode_layer(state, spec, 0, q, k[rows, last], v[rows, last], last.astype(jnp.int32),
                          jnp.ones(s, bool), tables)
    return out


def _dense_attention(q, k, v, lengths):
    out = np.zeros_like(q)
    group = HEADS // N_KV
    for b, n in enumerate(lengths):
        for h in range(HEADS):
            logits = k[b, :n, h // group] @ q[b, h] / np.sqrt(HEAD_DIM)
            p = np.exp(logits - logits.max())
            out[b, h] = (p / p.sum()) @ v[b, :n, h // group]
    return out


def _data(seed):
    rng = np.random.default_rng(seed)
    t = WIDTH * PAGE
    k = rng.standard_normal((len(LENGTHS), t, N_KV, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((len(LENGTHS), t, N_KV, HEAD_DIM)).astype(np.float32)
    q = rng.standard_normal((len(LENGTHS), HEADS, HEAD_DIM)).astype(np.float32)
    tables = rng.permutation(30)[:len(LENGTHS) * WIDTH].reshape(len(LENGTHS), WIDTH).astype(np.int32)
    return k, v, q, tables


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_float_attention_equals_dense_for_random_block_tables(seed):
    k, v, q, tables = _data(seed)
    spec = _spec("f32")
    assert spec.kernel_compatible  # goes through the decode_attention kernel API
    out = _fill_and_decode(spec, k, v, q, tables, LENGTHS)
    np.testing.assert_allclose(np.asarray(out), _dense_attention(q, k, v, LENGTHS), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("layout", ["int8", "int4:g16"])
def test_paged_quantized_attention_equals_dense_attention_over_the_round_trip(layout):
    k, v, q, tables = _data(3)
    spec = _spec(layout)
    out = _fill_and_decode(spec, k, v, q, tables, LENGTHS)
    fmt = spec.layout.key
    kq, vq = np.asarray(round_trip(jnp.asarray(k), fmt)), np.asarray(round_trip(jnp.asarray(v), fmt))
    np.testing.assert_allclose(np.asarray(out), _dense_attention(q, kq, vq, LENGTHS), rtol=1e-4, atol=1e-4)


def test_sink_positions_are_reassigned_inside_the_cache():
    """With sinks:2,window:6 at position 20 the cache holds positions 0, 1, 15..20; attention must
    equal attention with keys rotated at cache positions 0..7 and the query at position 7."""
    rng = np.random.default_rng(4)
    policy = parse_policy("sinks:2,window:6")
    spec = CacheSpec(1, N_KV, HEAD_DIM, PAGE, 4, 1, 2, parse_layout("f32"), policy)
    p = 20
    raw_k = rng.standard_normal((1, p + 1, N_KV, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((1, p + 1, N_KV, HEAD_DIM)).astype(np.float32)
    raw_q = rng.standard_normal((1, 1, HEADS, HEAD_DIM)).astype(np.float32)

    def rotate(x, positions):
        cos, sin = rope_angles(jnp.asarray(positions)[None], HEAD_DIM, 10000.0)
        return np.asarray(apply_rope(jnp.asarray(x), cos, sin, "half"))

    k_abs = rotate(raw_k, np.arange(p + 1))  # what the model stores: keys at their own positions
    q_abs = rotate(raw_q, [p])[:, 0]
    q_sink = rotate(raw_q, [policy.capacity - 1])[:, 0]
    tables = jnp.asarray([[2, 0]], jnp.int32)
    state = init_state(spec)
    held = [0, 1] + list(range(p - 5, p))  # what the cache holds before position p is decoded
    logical = jnp.asarray([[policy.slot(pos) for pos in held]])[..., None].repeat(N_KV, axis=2)
    state["k"] = write_tokens(state["k"], spec.layout.key, 0, tables, logical, jnp.asarray(k_abs[:, held]), spec)
    state["v"] = write_tokens(state["v"], spec.layout.value, 0, tables, logical, jnp.asarray(v[:, held]), spec)
    out, _ = decode_layer(state, spec, 0, jnp.asarray(q_abs), jnp.asarray(k_abs[:, p]), jnp.asarray(v[:, p]),
                          jnp.asarray([p], jnp.int32), jnp.ones(1, bool), tables, jnp.asarray(q_sink))
    kept = [0, 1] + list(range(p - 5, p + 1))
    k_cache = rotate(raw_k[:, kept], np.arange(len(kept)))  # re-assigned positions 0..7
    q_cache = rotate(raw_q, [len(kept) - 1])[:, 0]
    expected = _dense_attention(q_cache, k_cache, v[:, kept], [len(kept)])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_h2o_keeps_recent_tokens_and_heavy_hitters_per_head():
    rng = np.random.default_rng(5)
    policy = parse_policy("heavy:3,recent:4")
    spec = CacheSpec(1, N_KV, HEAD_DIM, PAGE, 4, 1, 2, parse_layout("f32"), policy)
    state = init_state(spec)
    tables = jnp.asarray([[1, 3]], jnp.int32)
    step = jax.jit(functools.partial(decode_layer, spec=spec, layer=0, active=jnp.ones(1, bool), tables=tables))
    q = rng.standard_normal((30, 1, HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((30, 1, N_KV, HEAD_DIM)).astype(np.float32)
    k[6] *= 6.0  # token 6 draws attention from later queries that align with it
    q[7:] += 2.0 * np.repeat(k[6][:, None, :, :], 2, axis=2).reshape(1, HEADS, HEAD_DIM)[None]
    v = rng.standard_normal((30, 1, N_KV, HEAD_DIM)).astype(np.float32)
    for p in range(30):
        _, state = step(state, q=jnp.asarray(q[p]), k=jnp.asarray(k[p]), v=jnp.asarray(v[p]),
                        positions=jnp.asarray([p], jnp.int32))
        held = np.asarray(state["slot_pos"][0, 0])  # [capacity, n_kv]
        for h in range(N_KV):
            column = held[:, h]
            assert len(set(column[column >= 0])) == (column >= 0).sum() == min(p + 1, 7)
            assert set(range(max(0, p - 3), p + 1)) <= set(column)  # the recent window is kept
    assert all(6 in set(held[:, h]) for h in range(N_KV))  # the heavy hitter survived
