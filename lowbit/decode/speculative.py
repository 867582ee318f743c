"""Speculative decoding: a cheap draft proposes gamma tokens, the target scores all gamma + 1
positions in one forward pass over its KV cache and keeps what it agrees with (greedy) or what exact
speculative sampling accepts; both caches roll back rejected tokens by their filled length."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.decode.compilation import StoredJit
from lowbit.decode.engine import prompt_bucket
from lowbit.decode.step import decode_forward, prefill_forward
from lowbit.kvcache.cache import DenseKVCache, PagedKVCache
from lowbit.kvcache.layout import parse_layout
from lowbit.kvcache.policy import FullPolicy, parse_policy


def layer_draft(model, n_layers: int):
    """The target's first n_layers blocks with its own final norm and head: a self-draft that shares
    every weight array with the target (no second copy)."""
    total = model.config.n_layers
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers < total:
        raise ValueError(f"n_layers must be an integer in [1, {total}) (the target has {total} blocks), "
                         f"got {n_layers!r}")
    draft = copy.copy(model)
    draft.layers = nnx.List(list(model.layers)[:n_layers])
    draft.config = dataclasses.replace(model.config, n_layers=n_layers)
    return draft


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Mean tokens one target pass yields when each draft token is accepted with probability alpha
    (Leviathan et al. 2023): (1 - alpha^(gamma+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def predicted_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """The paper's wall-clock speed-up for draft/target cost ratio c:
    (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1))."""
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost_ratio + 1.0)


def warp_probs(logits, temperature, top_k, top_p):
    """softmax(logits / temperature) restricted to the top_k tokens (0: all), then to the smallest
    set whose probability reaches top_p (1: all), renormalized. logits [..., V] -> f32 [..., V]."""
    z = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    vocab = z.shape[-1]
    ordered = -jnp.sort(-z, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, ordered.shape[:-1])[..., None], axis=-1)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    sorted_probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = (before < top_p) | (top_p >= 1.0)
    kept = kept & jnp.isfinite(ordered)
    count = jnp.maximum(kept.sum(axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
    return jax.nn.softmax(jnp.where(z >= threshold, z, -jnp.inf), axis=-1)


def _choose(logits, warp, greedy: bool):
    """Argmax ids [n] when greedy, else the warped probabilities [n, V]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return warp_probs(logits, *warp)


def _prefill(graphdef, params, cache_state, spec, tokens, real_len, table_row, warp, greedy):
    model = nnx.merge(graphdef, params)
    logits, cache_state = prefill_forward(model, cache_state, spec, tokens, jnp.int32(0), real_len,
                                          jnp.int32(0), table_row, False)
    return _choose(logits[None], warp, greedy)[0], cache_state


def _score_rows(model, cache_state, spec, tokens, start, table_row):
    """tokens [n] of slot 0 at positions start.. in one pass: each row is one decode query over the
    cache (all n written first, row i attends to positions <= start + i). Returns logits [n, V]."""
    n = tokens.shape[0]
    positions = start + jnp.arange(n, dtype=jnp.int32)
    tables = jnp.broadcast_to(table_row, (n, table_row.shape[0]))
    return decode_forward(model, cache_state, spec, tokens, positions, jnp.ones(n, bool), tables)


def _verify(graphdef, params, cache_state, spec, last, drafts, start, table_row, warp, greedy):
    """The target on [last, drafts...]: argmax [gamma+1] or probabilities [gamma+1, V]."""
    model = nnx.merge(graphdef, params)
    tokens = jnp.concatenate([last[None], drafts])
    logits, cache_state = _score_rows(model, cache_state, spec, tokens, start, table_row)
    return _choose(logits, warp, greedy), cache_state


def _feed(graphdef, params, cache_state, spec, tokens, start, table_row):
    """Write tokens into the cache (the draft catching up after a fully accepted round)."""
    model = nnx.merge(graphdef, params)
    return _score_rows(model, cache_state, spec, tokens, start, table_row)[1]


def _draft(graphdef, params, cache_state, spec, first, start, table_row, warp, key, gamma, greedy):
    """gamma draft tokens after `first` (at position start), one decode step each. Returns
    (tokens [gamma], probabilities [gamma, V] or None when greedy, cache_state)."""
    model = nnx.merge(graphdef, params)

    def step(carry, i):
        state, token = carry
        logits, state = decode_forward(model, state, spec, token[None], (start + i)[None], jnp.ones(1, bool),
                                       table_row[None])
        if greedy:
            token = jnp.argmax(logits[0]).astype(jnp.int32)
            return (state, token), (token, None)
        probs = warp_probs(logits[0], *warp)
        token = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(probs)).astype(jnp.int32)
        return (state, token), (token, probs)

    (cache_state, _), (tokens, probs) = jax.lax.scan(step, (cache_state, first),
                                                     jnp.arange(gamma, dtype=jnp.int32))
    return tokens, probs, cache_state


_prefill = StoredJit(_prefill, ("graphdef", "spec", "greedy"), ("cache_state",))
_verify = StoredJit(_verify, ("graphdef", "spec", "greedy"), ("cache_state",))
_feed = StoredJit(_feed, ("graphdef", "spec"), ("cache_state",))
_draft = StoredJit(_draft, ("graphdef", "spec", "gamma", "greedy"), ("cache_state",))


def _sample(weights: np.ndarray, rng: np.random.Generator) -> int:
    """A draw from weights (non-negative, any sum > 0) by inverse CDF in float64."""
    cdf = np.cumsum(weights, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def speculative_accept(p: np.ndarray, q: np.ndarray, drafts: Sequence[int],
                       rng: np.random.Generator) -> tuple[int, int]:
    """Exact speculative sampling for one round. p: target probabilities [gamma+1, V]; q: draft
    probabilities [gamma, V]; drafts: the gamma tokens drawn from q. Draft i is kept with probability
    min(1, p_i/q_i); the first rejected one is replaced by a draw from norm(max(0, p_i - q_i)); when
    all are kept, one more token comes from p_gamma. Returns (tokens accepted, the next token)."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    for i, token in enumerate(drafts):
        ratio = p[i, token] / q[i, token] if q[i, token] > 0 else 1.0
        if rng.random() < ratio:
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        return i, _sample(residual if residual.sum() > 0 else p[i], rng)
    return len(drafts), _sample(p[len(drafts)], rng)


@dataclasses.dataclass
class SpeculativeStats:
    """Counters of speculative generation. target_calls: verification passes of the target (the
    prompt's prefill not counted); tested: draft tokens the target judged (all accepted ones plus
    the first rejected one of each round); acceptance_rate: accepted / tested, the per-token
    acceptance probability alpha; tokens_per_call: tokens each verification pass yields."""

    tokens: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    drafted: int = 0
    tested: int = 0
    accepted: int = 0
    verified_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    target_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.verified_tokens / self.target_calls if self.target_calls else 0.0

    def add(self, other: SpeculativeStats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict:
        info = dataclasses.asdict(self)
        info.update(acceptance_rate=self.acceptance_rate, tokens_per_call=self.tokens_per_call)
        return info


class SpeculativeDecoder:
    """Generates with `target`, drafting `gamma` tokens per round with `draft` (any model with the
    target's vocabulary: layer_draft(target, n), a low-bit copy, another small model).

    Each model keeps its own KV cache of `layout` (default the target's dtype), contiguous or
    paged=True; a rejected draft token is rolled back by the cache's filled length. Only the full
    policy without a residual window can roll back (window, sinks and H2O policies have overwritten
    older tokens; KIVI's float residual ring has flushed them), so other caches are refused.
    """

    def __init__(self, target, draft, gamma: int = 4, *, layout=None, policy=None, paged: bool = False,
                 page_size: int | None = None):
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma must be a positive integer (draft tokens per round), got {gamma!r}")
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                             f"target's ({target.config.vocab_size}); a draft needs the target's tokenizer")
        policy = parse_policy(policy)
        if not isinstance(policy, FullPolicy):
            raise ValueError(f"policy {policy} cannot roll back rejected draft tokens (it evicts or "
                             "overwrites older tokens); speculative decoding needs the full policy")
        layout = parse_layout(layout or {"bfloat16": "bf16", "float16": "f16"}.get(
            jnp.dtype(target.dtype).name, "f32"))
        if layout.has_ring:
            raise ValueError(f"KV layout {layout.name!r} keeps a float residual ring that flushes older "
                             "tokens as new ones arrive, so it cannot roll back; use f32, bf16, f16, "
                             "int8, int4 or int2 (per token)")
        self.target, self.draft, self.gamma = target, draft, gamma
        self.layout, self.paged, self.page_size = layout, paged, page_size
        self.target_graph, self.target_params = nnx.split(target)
        self.draft_graph, self.draft_params = nnx.split(draft)
        self.stats = SpeculativeStats()
        self.target_cache = self.draft_cache = None

    def _cache(self, model, max_len: int):
        kind = PagedKVCache if self.paged else DenseKVCache
        cache = kind(model.config, self.layout, slots=1, max_len=max_len, page_size=self.page_size)
        cache.open()
        return cache

    def generate(self, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> np.ndarray:
        """Continue `prompt` by up to max_new_tokens (ending at eos_id). temperature 0 is greedy
        (the target's greedy output token for token); above 0 the tokens follow the target's
        distribution after temperature, top_k (0: off) and top_p (1: off), drawn with `seed`.
        Fills self.stats; self.target_cache / draft_cache hold the sequence afterwards."""
        prompt = np.asarray(prompt)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"prompt must be a non-empty 1-D sequence of token ids, got shape {prompt.shape}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
        vocab = self.target.config.vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        n, gamma = len(prompt), self.gamma
        limit = min(self.target.config.max_seq_len, self.draft.config.max_seq_len)
        need = n + max_new_tokens + gamma
        if need > limit:
            raise ValueError(f"prompt ({n}) + max_new_tokens ({max_new_tokens}) + gamma ({gamma}) exceeds "
                             f"the context length max_seq_len={limit}")
        max_len = min(limit, -(-need // 128) * 128)
        greedy = temperature == 0
        warp = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
        rng = np.random.default_rng(seed)
        key = jax.random.key(seed)
        stats = self.stats = SpeculativeStats()
        start_time = time.perf_counter()
        target = self.target_cache = self._cache(self.target, max_len)
        draft = self.draft_cache = self._cache(self.draft, max_len)

        tokens = np.zeros(prompt_bucket(n), np.int32)
        tokens[:n] = prompt
        first = None
        for cache, graph, params in ((target, self.target_graph, self.target_params),
                                     (draft, self.draft_graph, self.draft_params)):
            cache.reserve(0, n)
            chosen, cache.state = _prefill(graph, params, cache.state, cache.spec, jnp.asarray(tokens),
                                           jnp.int32(n), jnp.asarray(cache.block_tables()[0]), warp,
                                           greedy or first is not None)
            cache.advance(0, n)
            if first is None:
                first = int(chosen) if greedy else _sample(np.asarray(chosen), rng)
        stats.prefill_seconds = time.perf_counter() - start_time
        out = [first]
        behind = []  # tokens the draft cache lacks before out[-1] (after a fully accepted round)
        rounds = 0
        while len(out) < max_new_tokens and not (eos_id is not None and out[-1] == eos_id):
            length = target.length(0)
            tick = time.perf_counter()
            if behind:
                draft.reserve(0, length)
                draft.state = _feed(self.draft_graph, self.draft_params, draft.state, draft.spec,
                                    jnp.asarray(behind, jnp.int32), jnp.int32(draft.length(0)),
                                    jnp.asarray(draft.block_tables()[0]))
                draft.advance(0, length)
                stats.draft_calls += 1
                behind = []
            draft.reserve(0, length + gamma)
            drafts, q, draft.state = _draft(self.draft_graph, self.draft_params, draft.state, draft.spec,
                                            jnp.int32(out[-1]), jnp.int32(length),
                                            jnp.asarray(draft.block_tables()[0]), warp,
                                            jax.random.fold_in(key, rounds), gamma, greedy)
            draft.advance(0, length + gamma)
            stats.draft_calls += gamma
            jax.block_until_ready(drafts)  # the target's pass waits for them anyway; time the draft alone
            tock = time.perf_counter()
            target.reserve(0, length + gamma + 1)
            scored, target.state = _verify(self.target_graph, self.target_params, target.state, target.spec,
                                           jnp.int32(out[-1]), drafts, jnp.int32(length),
                                           jnp.asarray(target.block_tables()[0]), warp, greedy)
            target.advance(0, length + gamma + 1)
            drafts = [int(t) for t in np.asarray(drafts)]
            scored = np.asarray(scored)
            if greedy:
                accepted = 0
                while accepted < gamma and drafts[accepted] == int(scored[accepted]):
                    accepted += 1
                following = int(scored[accepted])
            else:
                accepted, following = speculative_accept(scored, np.asarray(q), drafts, rng)
            now = time.perf_counter()
            stats.draft_seconds += tock - tick
            stats.target_seconds += now - tock
            rounds += 1
            stats.target_calls += 1
            stats.drafted += gamma
            stats.tested += min(accepted + 1, gamma)
            stats.accepted += accepted
            stats.verified_tokens += accepted + 1
            target.truncate(0, length + accepted + 1)
            draft.truncate(0, length + min(accepted, gamma - 1) + 1)
            if accepted == gamma:
                behind = [drafts[-1]]
            new = drafts[:accepted] + [following]
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id) + 1]
            out.extend(new)
        out = out[:max_new_tokens]
        stats.tokens = len(out)
        stats.seconds = time.perf_counter() - start_time
        return np.asarray(out, np.int32)
