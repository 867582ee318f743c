"""How much a KV cache layout or policy changes a model's predictions: teacher-forced perplexity and KL
against the exact cache, with each query seeing every key/value as the cache holds it when that token
is decoded (one forward pass, checked against token-by-token decoding), plus baselines.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lowbit.decode.step import decode_step
from lowbit.eval.perplexity import position_sums, summarize_sums
from lowbit.kvcache.cache import DenseKVCache, PagedKVCache
from lowbit.kvcache.layout import KVLayout, TensorFormat, parse_layout, round_trip, running_group_round_trip
from lowbit.kvcache.policy import FullPolicy, Policy, WindowPolicy, parse_policy

NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class CacheQuality:
    """ppl: perplexity with the cache; ref_ppl: with the exact cache, on the same positions;
    kl: mean KL(exact || cache) in nats per scored position; top1: share of positions whose
    argmax agrees; tokens: positions scored."""

    ppl: float
    ref_ppl: float
    kl: float
    top1: float
    tokens: int


def _masks(fmt: TensorFormat, t: int):
    """(quantized [T, T], running [T, T] or None): which key j the query at i sees quantized with
    final scales, or quantized on the fly inside its partial group."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    if not fmt.quantized:
        return jnp.zeros((t, t), bool), None
    if fmt.axis == "token":
        return j <= i - fmt.residual, None
    ring = fmt.ring_length
    if fmt.residual:
        return j < i // ring * ring, None
    first = i // ring * ring
    return j < first, (j >= first) & (j <= i)


def _running(x, fmt: TensorFormat):
    """x [B, T, n_kv, hd] -> [B, T/G, G(query offset a), G(key offset i), n_kv, hd]: key i of each group
    as the query at offset a sees it (quantized with the min/max of tokens 0..a of the group)."""
    b, t, h, d = x.shape
    g = fmt.group
    blocks = x.reshape(b, t // g, 1, g, h, d)
    blocks = jnp.broadcast_to(blocks, (b, t // g, g, g, h, d))
    count = jnp.broadcast_to(jnp.arange(1, g + 1), (b, t // g, g))
    return running_group_round_trip(blocks, count, fmt)


def emulated_attention(q, q_sink, k, v, layout: KVLayout, policy: Policy):
    """Causal attention where query i sees the cache's version of every key/value.

    q, q_sink: [B, T, H, hd] after RoPE (q_sink rotated at min(i, capacity - 1); sinks only);
    k, v: [B, T, n_kv, hd] after RoPE (keys). Returns [B, T, H, hd] f32.
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    grp = h // n_kv
    qg = q.astype(jnp.float32).reshape(b, t, n_kv, grp, d) * d ** -0.5
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    kfmt, vfmt = layout.key, layout.value
    k_seen = round_trip(kf, kfmt)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, kf if kfmt.quantized else k_seen)
    k_quant, k_run = _masks(kfmt, t)
    if kfmt.quantized:
        scores = jnp.where(k_quant, jnp.einsum("btkgd,bskd->bkgts", qg, k_seen), scores)
    nb = None
    if k_run is not None:
        g = kfmt.group
        nb = t // g
        run = _running(kf, kfmt)
        qb = qg.reshape(b, nb, g, n_kv, grp, d)
        run_scores = jnp.einsum("bnakcd,bnaikd->bkcnai", qb, run)
        s6 = scores.reshape(b, n_kv, grp, nb, g, nb, g)
        diag = jnp.eye(nb, dtype=bool)[:, None, :, None] & (jnp.arange(g)[None, :] <= jnp.arange(g)[:, None])[None, :, None, :]
        s6 = jnp.where(diag, run_scores[:, :, :, :, :, None, :], s6)
        scores = s6.reshape(b, n_kv, grp, t, t)
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    valid = j <= i
    if isinstance(policy, WindowPolicy):
        cap = policy.capacity
        valid = valid & ((i < cap) | (j < policy.sinks) | (j > i - policy.window))
        if policy.sinks:
            qs = q_sink.astype(jnp.float32).reshape(b, t, n_kv, grp, d) * d ** -0.5
            sink_keys = (k_seen if kfmt.quantized else kf)[:, :policy.sinks]
            sink_scores = jnp.einsum("btkgd,bskd->bkgts", qs, sink_keys)
            scores = scores.at[..., :policy.sinks].set(sink_scores)
    elif not isinstance(policy, FullPolicy):
        raise ValueError(f"policy {policy} cannot be emulated in one pass (H2O depends on the "
                         "attention history); use teacher_forced_decode_logits")
    probs = jax.nn.softmax(jnp.where(valid, scores, NEG), axis=-1)
    probs = jnp.where(valid, probs, 0.0)
    v_quant, v_run = _masks(vfmt, t)
    if not vfmt.quantized:
        out = jnp.einsum("bkgts,bskd->btkgd", probs, round_trip(vf, vfmt))
    else:
        float_part = ~v_quant if v_run is None else ~(v_quant | v_run)
        out = jnp.einsum("bkgts,bskd->btkgd", jnp.where(float_part, probs, 0.0), vf)
        out = out + jnp.einsum("bkgts,bskd->btkgd", jnp.where(v_quant, probs, 0.0), round_trip(vf, vfmt))
        if v_run is not None:
            g = vfmt.group
            nb = t // g
            p6 = probs.reshape(b, n_kv, grp, nb, g, nb, g)
            diag = jnp.diagonal(p6, axis1=3, axis2=5)  # [b, k, c, a, i, n]
            diag = jnp.where(jnp.arange(g)[None, :, None] <= jnp.arange(g)[:, None, None], diag, 0.0)
            run = _running(vf, vfmt)
            run_out = jnp.einsum("bkcain,bnaikd->bnakcd", diag, run)
            out = out + run_out.reshape(b, t, n_kv, grp, d)
    return out.reshape(b, t, h, d)


def _check_emulable(layout: KVLayout, policy: Policy, t: int) -> None:
    for fmt in (layout.key, layout.value):
        if fmt.quantized and fmt.axis == "channel" and t % fmt.group:
            raise ValueError(f"ctx ({t}) must be a multiple of the token group {fmt.group}")
    if layout.has_ring and not isinstance(policy, FullPolicy):
        raise ValueError("a layout with a residual window needs the full policy")


@dataclasses.dataclass(frozen=True)
class EmulatedCache:
    """The model's AttentionCache for a whole sequence at once from position 0, where each query
    sees every key/value as `layout` and `policy` hold it when that token is decoded."""

    layout: KVLayout
    policy: Policy

    def attend(self, layer: int, q, k, v, rotate_query):
        """q: [B, T, H, hd], k, v: [B, T, n_kv, hd] (after RoPE) -> ([B, T, H, hd] f32, self)."""
        q_sink = None
        if isinstance(self.policy, WindowPolicy) and self.policy.sinks:
            b, t = q.shape[:2]
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            q_sink = rotate_query(jnp.minimum(positions, self.policy.capacity - 1))
        return emulated_attention(q, q_sink, k, v, self.layout, self.policy), self


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "policy"))
def _emulated_block(graphdef, params, x, layout, policy):
    block = nnx.merge(graphdef, params)
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None]
    return block(x, positions, EmulatedCache(layout, policy))[0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _exact_block(graphdef, params, x):
    block = nnx.merge(graphdef, params)
    return block(x, jnp.arange(x.shape[1], dtype=jnp.int32)[None])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, params, tokens):
    return nnx.merge(graphdef, params).embed_tokens(tokens)


def final_hidden(model, tokens, layout: str | KVLayout | None = None, policy: str | Policy | None = None):
    """Hidden states before the output head, [B, T, d_model]: with the exact attention when layout
    is None, else with the emulated cache. Each block is jit-compiled once (blocks share a graph)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    graphdef, params = nnx.split(model)
    x = _embed(graphdef, params, tokens)
    if layout is not None:
        layout = parse_layout(layout)
        policy = parse_policy(policy).resolve(tokens.shape[1])
        _check_emulable(layout, policy, tokens.shape[1])
    for block in model.layers:
        block_def, block_params = nnx.split(block)
        if layout is None:
            x = _exact_block(block_def, block_params, x)
        else:
            x = _emulated_block(block_def, block_params, x, layout, policy)
    return x


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _compare_chunk(graphdef, params, hidden, ref_hidden, targets, weight):
    """position_sums of the logits from hidden against those from ref_hidden."""
    model = nnx.merge(graphdef, params)
    logp = jax.nn.log_softmax(model.head(hidden).astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(model.head(ref_hidden).astype(jnp.float32), axis=-1)
    return position_sums(logp, targets, weight, ref_logp)


def compare_hidden(model, hidden, ref_hidden, tokens, weight=None, chunk: int = 256) -> np.ndarray:
    """[nll, ref_nll, kl, top1, count] sums over positions 0..T-2 predicting tokens 1..T-1, in chunks
    of positions so that no [T, vocab] logits are held. weight: [B, T-1] (default all ones)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if weight is None:
        weight = jnp.ones((b, t - 1), jnp.float32)
    graphdef, params = nnx.split(model)
    totals = np.zeros(5)
    for start in range(0, t - 1, chunk):
        stop = min(t - 1, start + chunk)
        pad = chunk - (stop - start)
        sl = lambda a: jnp.pad(a[:, start:stop], [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        totals += np.asarray(_compare_chunk(graphdef, params, sl(hidden), sl(ref_hidden),
                                            sl(tokens[:, 1:]), sl(jnp.asarray(weight, jnp.float32))), np.float64)
    return totals


def score_logits(logits, ref_logits, targets) -> np.ndarray:
    """[nll, ref_nll, kl, top1, count] sums for logits / ref_logits [n, vocab] predicting targets [n]."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    ref = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), -1)
    targets = jnp.asarray(targets)
    return np.asarray(position_sums(logp, targets, jnp.ones(targets.shape), ref), np.float64)


def summarize(totals) -> CacheQuality:
    r = summarize_sums(totals)
    return CacheQuality(ppl=r["ppl"], ref_ppl=r["ref_ppl"], kl=r["kl"], top1=r["top1"], tokens=r["tokens"])


def cache_quality(model, windows, configs: dict, *, weight=None, progress: bool = False) -> dict:
    """Teacher-forced quality of each cache config against the exact cache.

    windows: int [n, T] token windows; configs: name -> (layout, policy). Returns name -> CacheQuality
    over all positions (or those with weight [n, T-1] > 0), windows run one at a time.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, T] with T >= 2, got shape {windows.shape}")
    totals = {name: np.zeros(5) for name in configs}
    bar = tqdm(total=len(windows) * len(configs), desc="kv quality", disable=not progress, leave=False)
    for w in range(len(windows)):
        tokens = windows[w:w + 1]
        ref = final_hidden(model, tokens)
        wt = None if weight is None else np.asarray(weight)[w:w + 1]
        for name, (layout, policy) in configs.items():
            hidden = final_hidden(model, tokens, layout, policy)
            totals[name] += compare_hidden(model, hidden, ref, tokens, wt)
            bar.update(1)
    bar.close()
    return {name: summarize(t) for name, t in totals.items()}


# ---- baselines and the real thing ----------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_logits(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    return model(tokens)[:, -1]


def recompute_logits(model, tokens, cache_size: int, positions, batch: int = 8) -> np.ndarray:
    """Sliding window with re-computation: the logits at each of `positions` of a 1-D token array from
    a fresh forward over the last cache_size tokens (positions 0..cache_size-1). -> [n, vocab]."""
    tokens = np.asarray(tokens, np.int32)
    positions = [int(p) for p in positions]
    if any(p < cache_size - 1 or p >= len(tokens) for p in positions):
        raise ValueError(f"positions must lie in [{cache_size - 1}, {len(tokens)})")
    graphdef, params = nnx.split(model)
    out = []
    for start in range(0, len(positions), batch):
        chunk = positions[start:start + batch]
        rows = [tokens[p - cache_size + 1:p + 1] for p in chunk]
        rows += [rows[0]] * (batch - len(rows))
        logits = _last_logits(graphdef, params, jnp.asarray(np.stack(rows)))
        out.append(np.asarray(logits)[:len(chunk)])
    return np.concatenate(out)


def teacher_forced_decode_logits(model, tokens, layout="f32", policy=None, *, page_size=None,
                                 max_len=None, contiguous: bool = False) -> np.ndarray:
    """Decode every token of tokens [B, T] one step at a time through a PagedKVCache (DenseKVCache
    when contiguous; one slot per row, starting from an empty cache) and return the logits
    [B, T, vocab] after each token."""
    tokens = np.asarray(tokens, np.int32)
    b, t = tokens.shape
    cache_type = DenseKVCache if contiguous else PagedKVCache
    cache = cache_type(model.config, layout, policy, slots=b, max_len=max_len or t, page_size=page_size)
    slots = [cache.open() for _ in range(b)]
    graphdef, params = nnx.split(model)
    key = jax.random.key_data(jax.random.key(0))
    keys = jnp.stack([key] * b)
    zeros = jnp.zeros(b, jnp.float32)
    counters = jnp.zeros(b, jnp.int32)
    active = jnp.ones(b, bool)
    out = []
    for p in range(t):
        for slot in slots:
            cache.reserve(slot, p + 1)
        _, logits, cache.state = decode_step(
            graphdef, params, cache.state, cache.spec, jnp.asarray(tokens[:, p]),
            jnp.full(b, p, jnp.int32), active, jnp.asarray(cache.block_tables()), zeros, keys,
            counters, return_logits=True)
        for slot in slots:
            cache.advance(slot, p + 1)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


__all__ = [
    "CacheQuality", "EmulatedCache", "cache_quality", "compare_hidden", "emulated_attention", "final_hidden",
    "recompute_logits", "score_logits", "summarize", "teacher_forced_decode_logits",
]
