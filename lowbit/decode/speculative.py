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

from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec
from lowbit.decode.compilation import StoredJit
from lowbit.decode.engine import prompt_bucket
from lowbit.decode.step import decode_forward, prefill_forward
from lowbit.kernels.dispatch import check_activations
from lowbit.kernels.gguf_matmul import GGUF_BLOCKS
from lowbit.kvcache.cache import DenseKVCache, PagedKVCache
from lowbit.kvcache.layout import parse_layout
from lowbit.kvcache.policy import FullPolicy, parse_policy
from lowbit.models.gguf.encode import encode_values
from lowbit.nn.contraction import DotContraction
from lowbit.nn.gguf_layers import GgufLinear, set_activations
from lowbit.nn.packed_layer import PackedLayer

BLOCK_LINEARS = (("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"),
                 ("mlp", "w_gate"), ("mlp", "w_up"), ("mlp", "w_down"))


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


def _float_matrix(module, where: str):
    """The [K, N] f32 matrix a block linear multiplies its input rows by, as they come: an
    nnx.Linear's kernel, or a GGUF or packed layer's weights dequantized now (one matrix at a time)."""
    if isinstance(module, nnx.Linear) and module.bias is None:
        return jnp.asarray(module.kernel[...], jnp.float32)
    transforms_input = any(getattr(module, name, None) not in (None, False)
                           for name in ("act_spec", "input_scale", "input_transform", "input_norm", "bias"))
    if hasattr(module, "dequantized_matrix") and not transforms_input:
        return jnp.asarray(module.dequantized_matrix(), jnp.float32)
    raise ValueError(f"{where} is a {type(module).__name__} that is not a plain matrix product (it has a bias or "
                     "quantizes, scales or rotates its input); a low-bit draft is made from float, GGUF-packed or "
                     "weight-only packed block linears")


def quantized_draft(model, weights: QuantSpec | str, activations: str = "f32"):
    """A low-bit self-draft: every block linear of `model` (float or GGUF-packed) rounded to nearest
    and packed, one matrix at a time (one float matrix extra at most, never a second float model);
    the embedding, norms and head are the target's own arrays, shared (lowbit.ptq.quantize_embeddings
    on the result gives the draft a Q8_0 head of its own). weights: a lowbit weight spec (e.g.
    "int4:g64", "int2:g64", "ternary:g64": PackedLayers, run through packed_matmul where
    lowbit.nn.packed_layer.kernel_supports the format) or a GGUF block type ("Q8_0", "Q4_0",
    "Q4_1": GgufLinears holding the blocks llama.cpp would write, run through gguf_matmul).
    activations: "int8" runs the draft's linears with int8 activations (a cheaper draft; the output
    stays exactly the target's, which verifies every token), "auto" int8 only in the native
    decode GEMVs (lowbit.kernels.dispatch.choose_activations), "f32" the float product."""
    check_activations(activations)
    ggml_type = weights.upper() if isinstance(weights, str) and weights.upper() in GGUF_BLOCKS else None
    if ggml_type is None:
        try:
            spec = QuantSpec.parse(weights)
        except ValueError as error:
            raise ValueError(f"weights: {error} (or a GGUF block type: {', '.join(GGUF_BLOCKS)})") from None
    layers = []
    for index, source in enumerate(model.layers):
        block = copy.copy(source)
        block.attn, block.mlp = copy.copy(source.attn), copy.copy(source.mlp)
        for part, name in BLOCK_LINEARS:
            matrix = _float_matrix(getattr(getattr(source, part), name), f"layers.{index}.{part}.{name}")
            k, n = matrix.shape
            if ggml_type is not None:
                if k % 32:
                    raise ValueError(f"layers.{index}.{part}.{name}: {k} inputs are not a multiple of 32, "
                                     f"the {ggml_type} block size")
                layer = GgufLinear(jnp.asarray(encode_values(np.asarray(matrix).T, ggml_type)), ggml_type,
                                   activations=activations)
            else:
                layer = PackedLayer(DotContraction((k,), (n,), (-1,)), pack(quantize(matrix, spec, axis=0)),
                                    dtype=model.dtype)
                if activations != "f32":
                    set_activations(layer, activations)
            setattr(getattr(block, part), name, layer)
            del matrix
        layers.append(block)
    draft = copy.copy(model)
    draft.layers = nnx.List(layers)
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


def _draft(graphdef, params, cache_state, spec, prefix, start, table_row, warp, key, threshold, gamma, greedy):
    """Up to gamma draft tokens after prefix [k]: the tokens at positions start-k+1 .. start that the
    draft cache lacks (the last accepted one and, after a fully accepted round, the round's last
    draft before it), all k in the first pass, then one decode step per token. Drafting stops after
    a token whose top probability is below threshold (0: never). Returns (tokens [gamma],
    probabilities [gamma, V] or None when greedy, the number drafted, cache_state)."""
    model = nnx.merge(graphdef, params)

    def choose(logits, i):
        if greedy:
            token = jnp.argmax(logits).astype(jnp.int32)
            return token, None, jnp.max(jax.nn.softmax(logits.astype(jnp.float32)))
        probs = warp_probs(logits, *warp)
        token = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(probs)).astype(jnp.int32)
        return token, probs, jnp.max(probs)

    def store(tokens, probs_seen, i, token, probs):
        return tokens.at[i].set(token), None if greedy else probs_seen.at[i].set(probs)

    logits, cache_state = _score_rows(model, cache_state, spec, prefix, start - (prefix.shape[0] - 1), table_row)
    token, probs, confidence = choose(logits[-1], 0)
    tokens, probs_seen = store(jnp.zeros(gamma, jnp.int32),
                               None if greedy else jnp.zeros((gamma, logits.shape[-1]), jnp.float32),
                               0, token, probs)

    def going(carry):
        _, _, _, i, confidence = carry
        return (i < gamma) & (confidence >= threshold)

    def step(carry):
        state, tokens, probs_seen, i, _ = carry
        logits, state = decode_forward(model, state, spec, tokens[i - 1][None], (start + i)[None], jnp.ones(1, bool),
                                       table_row[None])
        token, probs, confidence = choose(logits[0], i)
        tokens, probs_seen = store(tokens, probs_seen, i, token, probs)
        return state, tokens, probs_seen, i + 1, confidence

    cache_state, tokens, probs_seen, count, _ = jax.lax.while_loop(
        going, step, (cache_state, tokens, probs_seen, jnp.int32(1), confidence))
    return tokens, probs_seen, count, cache_state


_prefill = StoredJit(_prefill, ("graphdef", "spec", "greedy"), ("cache_state",))
_verify = StoredJit(_verify, ("graphdef", "spec", "greedy"), ("cache_state",))
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

    confidence_threshold (adaptive gamma): a round stops drafting after a token whose draft
    probability (the top one of the warped distribution; of the softmax when greedy) is below it,
    so gamma is the most per round; 0 (default) always drafts gamma. Exactness is unaffected.
    """

    def __init__(self, target, draft, gamma: int = 4, *, layout=None, policy=None, paged: bool = False,
                 page_size: int | None = None, confidence_threshold: float = 0.0):
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma must be a positive integer (draft tokens per round), got {gamma!r}")
        if isinstance(confidence_threshold, bool) or not isinstance(confidence_threshold, (int, float)) \
                or not 0 <= confidence_threshold < 1:
            raise ValueError(f"confidence_threshold must be a number in [0, 1) (0: always draft gamma tokens), "
                             f"got {confidence_threshold!r}")
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
        self.confidence_threshold = float(confidence_threshold)
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
        behind = []  # the last draft of a fully accepted round: the draft cache lacks it before out[-1]
        rounds = 0
        while len(out) < max_new_tokens and not (eos_id is not None and out[-1] == eos_id):
            length = target.length(0)
            tick = time.perf_counter()
            draft.reserve(0, length + gamma)
            drafts, q, count, draft.state = _draft(
                self.draft_graph, self.draft_params, draft.state, draft.spec,
                jnp.asarray(behind + [out[-1]], jnp.int32), jnp.int32(length), jnp.asarray(draft.block_tables()[0]),
                warp, jax.random.fold_in(key, rounds), jnp.float32(self.confidence_threshold), gamma, greedy)
            count = int(count)  # the target's pass needs it anyway; this also times the draft alone
            draft.advance(0, length + count)
            stats.draft_calls += count
            tock = time.perf_counter()
            drafts = drafts[:count]
            target.reserve(0, length + count + 1)
            scored, target.state = _verify(self.target_graph, self.target_params, target.state, target.spec,
                                           jnp.int32(out[-1]), drafts, jnp.int32(length),
                                           jnp.asarray(target.block_tables()[0]), warp, greedy)
            target.advance(0, length + count + 1)
            drafts = [int(t) for t in np.asarray(drafts)]
            scored = np.asarray(scored)
            if greedy:
                accepted = 0
                while accepted < count and drafts[accepted] == int(scored[accepted]):
                    accepted += 1
                following = int(scored[accepted])
            else:
                accepted, following = speculative_accept(scored, np.asarray(q)[:count], drafts, rng)
            now = time.perf_counter()
            stats.draft_seconds += tock - tick
            stats.target_seconds += now - tock
            rounds += 1
            stats.target_calls += 1
            stats.drafted += count
            stats.tested += min(accepted + 1, count)
            stats.accepted += accepted
            stats.verified_tokens += accepted + 1
            target.truncate(0, length + accepted + 1)
            draft.truncate(0, length + min(accepted, count - 1) + 1)
            behind = [drafts[-1]] if accepted == count else []
            new = drafts[:accepted] + [following]
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id) + 1]
            out.extend(new)
        out = out[:max_new_tokens]
        stats.tokens = len(out)
        stats.seconds = time.perf_counter() - start_time
        return np.asarray(out, np.int32)
