"""Batched generation from one paged KV pool: prompts of different lengths decode together in fixed
slots, new requests join as others finish (continuous batching), common prompt prefixes share
pages, and a pool that runs out of pages preempts the newest sequence (recomputed later).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lowbit.decode.step import MAX_DECODE_STEPS, decode_steps, prefill_step
from lowbit.kvcache.allocator import OutOfBlocksError
from lowbit.kvcache.cache import DenseKVCache, PagedKVCache
from lowbit.kvcache.policy import FullPolicy


def prompt_bucket(length: int) -> int:
    """The padded prompt length that prefill compiles for: the next power of two up to 128,
    then the next multiple of 128, so that prompts of similar length share one executable."""
    if length <= 128:
        return max(16, 1 << (length - 1).bit_length())
    return -(-length // 128) * 128


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to continue. temperature 0 is greedy; above 0 needs `key` (a jax PRNG key); token
    i of the continuation is drawn with fold_in(key, i), so results do not depend on batching."""

    prompt: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    key: Any = None
    eos_id: int | None = None

    def __post_init__(self):
        prompt = np.asarray(self.prompt)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"prompt must be a non-empty 1-D sequence of token ids, got {self.prompt!r:.80}")
        object.__setattr__(self, "prompt", tuple(int(t) for t in prompt))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.temperature > 0 and self.key is None:
            raise ValueError("key (a jax PRNG key) is required when temperature > 0")


@dataclasses.dataclass
class Completion:
    """The new tokens of one request; finish_reason is "eos" or "length"."""

    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    preemptions: int = 0


@dataclasses.dataclass
class GenerationStats:
    """Counters of one generate() call; utilization is averaged over decode steps; prefill_seconds
    and decode_seconds are the wall time spent in the two jitted steps (compilation included);
    first_token_seconds: from the start of generate() to the first new token."""

    requests: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    shared_prefix_tokens: int = 0
    decode_steps: int = 0
    prefills: int = 0
    preemptions: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    peak_pages: int = 0
    mean_utilization: float = 0.0
    mean_batch: float = 0.0
    first_token_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens made by decode steps per second of decode steps (prefill excluded)."""
        made = self.generated_tokens - self.prefills
        return made / self.decode_seconds if self.decode_seconds else 0.0


@dataclasses.dataclass
class _Sequence:
    index: int
    request: Request
    generated: list[int]
    key_data: Any
    order: int = 0
    preemptions: int = 0


class BatchedGenerator:
    """Serves many requests from one KV cache with `slots` sequences decoding per step.

    layout / policy: see lowbit.kvcache (e.g. "int8", "kivi2"; "sinks:4,window:1024").
    max_len: tokens per sequence (prompt + new) for the full policy; num_pages: pool size (default:
    every slot at max_len); contiguous=True reserves max_len per slot instead of paging.
    share_prefixes: a new prompt that starts with at least one page of a running sequence's tokens
    reuses those pages (float or per-token layouts without a residual, full policy).
    The decode step is jit-compiled once (slots and block tables padded to fixed shapes); prompts
    are prefilled one at a time, padded to prompt_bucket lengths.
    """

    def __init__(self, model, layout="f32", policy=None, *, slots: int = 8, max_len: int | None = None,
                 num_pages: int | None = None, page_size: int | None = None, contiguous: bool = False,
                 share_prefixes: bool = True, min_bucket: int = 16):
        if isinstance(min_bucket, bool) or not isinstance(min_bucket, int) or min_bucket < 1:
            raise ValueError(f"min_bucket must be a positive integer, got {min_bucket!r}")
        self.model = model
        if contiguous:
            if num_pages is not None:
                raise ValueError("num_pages is fixed (slots * max_len) for a contiguous cache")
            self.cache = DenseKVCache(model.config, layout, policy, slots=slots, max_len=max_len,
                                      page_size=page_size)
        else:
            self.cache = PagedKVCache(model.config, layout, policy, slots=slots, max_len=max_len,
                                      num_pages=num_pages, page_size=page_size)
        self.graphdef, self.params = nnx.split(model)
        layout = self.cache.layout
        self.share_prefixes = (share_prefixes and not contiguous and not layout.has_ring
                               and isinstance(self.cache.policy, FullPolicy))
        groups = [f.group for f in (layout.key, layout.value) if f.quantized and f.axis == "channel"]
        self.bucket_multiple = max([min_bucket] + groups)
        self.stats = GenerationStats()
        self._order = 0
        self._start = time.perf_counter()
        self._key_shape = jax.random.key_data(jax.random.key(0)).shape

    # ---- public ----------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], *, progress: bool = False) -> list[Completion]:
        """Run every request to completion; returns their completions in request order."""
        requests = list(requests)
        for i, request in enumerate(requests):
            if not isinstance(request, Request):
                raise ValueError(f"requests[{i}] must be a Request, got {type(request).__name__}")
            limit = self.model.config.max_seq_len
            if len(request.prompt) > limit:
                raise ValueError(f"requests[{i}]: a prompt of {len(request.prompt)} tokens exceeds the "
                                 f"model's context length max_seq_len={limit}")
            need = len(request.prompt) + request.max_new_tokens - 1
            if isinstance(self.cache.policy, FullPolicy) and need > self.cache.max_len:
                raise ValueError(f"requests[{i}]: prompt ({len(request.prompt)}) + max_new_tokens "
                                 f"({request.max_new_tokens}) exceeds max_len={self.cache.max_len} + 1")
            pages = self.cache.pages_needed(need)
            if pages > self.cache.allocator.num_blocks:
                raise ValueError(f"requests[{i}] needs {pages} KV pages (prompt + max_new_tokens) but "
                                 f"the pool holds num_pages={self.cache.allocator.num_blocks} pages "
                                 f"of {self.cache.page_size} tokens; give more pages or fewer tokens")
            vocab = self.model.config.vocab_size
            if max(request.prompt) >= vocab or min(request.prompt) < 0:
                raise ValueError(f"requests[{i}]: token ids must lie in [0, {vocab})")
        self.stats = GenerationStats(requests=len(requests))
        pending = collections.deque(
            _Sequence(i, r, [], self._key_data(r)) for i, r in enumerate(requests))
        running: dict[int, _Sequence] = {}
        done: list[Completion | None] = [None] * len(requests)
        utilization = []
        start = self._start = time.perf_counter()
        bar = tqdm(total=sum(r.max_new_tokens for r in requests), desc="generate", unit="tok",
                   disable=not progress, leave=False)
        while pending or running:
            self._admit(pending, running, done, bar)
            if not running:
                continue
            self._make_room(pending, running)
            if not running:
                continue
            self._decode(running, done, bar, self._steps_ahead(pending, running))
            memory = self.cache.memory()
            utilization.append(memory.utilization)
            self.stats.peak_pages = max(self.stats.peak_pages, memory.pages_allocated)
        bar.close()
        self.stats.seconds = time.perf_counter() - start
        self.stats.mean_utilization = float(np.mean(utilization)) if utilization else 1.0
        if self.stats.decode_steps:
            self.stats.mean_batch = (self.stats.generated_tokens - self.stats.prefills) / self.stats.decode_steps
        return done

    # ---- steps -----------------------------------------------------------------------------
    @staticmethod
    def _key_data(request: Request):
        key = request.key if request.key is not None else jax.random.key(0)
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        return jax.random.key_data(key)

    def _admit(self, pending, running, done, bar) -> None:
        cache = self.cache
        while pending and cache.num_open < cache.slots:
            seq = pending[0]
            context = list(seq.request.prompt) + seq.generated  # a preempted one is recomputed
            source, shared = self._find_prefix(context, running)
            needed = cache.pages_needed(len(context) + 1) - shared // cache.page_size + (1 if shared else 0)
            if cache.allocator.num_free < needed and not isinstance(cache, DenseKVCache):
                if not running:
                    raise OutOfBlocksError(
                        f"request {seq.index} needs {needed} KV pages but the pool has "
                        f"{cache.allocator.num_free} free of {cache.allocator.num_blocks}")
                return
            pending.popleft()
            if source is not None:
                slot = cache.fork(source, length=shared)
            else:
                slot, shared = cache.open(), 0
            try:
                cache.reserve(slot, len(context))
            except OutOfBlocksError:
                cache.close(slot)
                pending.appendleft(seq)
                if not running:
                    raise
                return
            self.stats.shared_prefix_tokens += shared
            token = self._prefill(slot, context, shared, seq)
            cache.advance(slot, len(context))
            self._order += 1
            seq.order = self._order
            self._append(slot, seq, token, running, done, bar)

    def _find_prefix(self, context: list[int], running) -> tuple[int | None, int]:
        """(slot, tokens) of the running sequence sharing the longest prefix (>= one page)."""
        if not self.share_prefixes:
            return None, 0
        best, best_len = None, 0
        for slot, seq in running.items():
            held = list(seq.request.prompt) + seq.generated
            held = held[:self.cache.length(slot)]
            n = 0
            for a, b in zip(held, context):
                if a != b:
                    break
                n += 1
            n = min(n, len(context) - 1)
            if n > best_len:
                best, best_len = slot, n
        if best_len < self.cache.page_size:
            return None, 0
        return best, best_len

    def _bucket(self, n: int) -> int:
        size = max(self.bucket_multiple, prompt_bucket(n))
        return math.ceil(size / self.bucket_multiple) * self.bucket_multiple

    def _prefill(self, slot: int, context: list[int], shared: int, seq: _Sequence) -> int:
        chunk = context[shared:]
        tokens = np.zeros(self._bucket(len(chunk)), np.int32)
        tokens[:len(chunk)] = chunk
        table = self.cache.block_tables()[slot]
        start = time.perf_counter()
        token, _, self.cache.state = prefill_step(
            self.graphdef, self.params, self.cache.state, self.cache.spec, jnp.asarray(tokens),
            jnp.int32(shared), jnp.int32(len(chunk)), jnp.int32(slot), jnp.asarray(table),
            jnp.float32(seq.request.temperature), seq.key_data, jnp.int32(len(seq.generated)),
            has_prefix=shared > 0)
        token = int(token)
        self.stats.prefill_seconds += time.perf_counter() - start
        self.stats.prefills += 1
        self.stats.prefill_tokens += len(chunk)
        return token

    def _make_room(self, pending, running) -> None:
        """Reserve this step's write for every running sequence, oldest first; when the pool is
        short, preempt the newest sequence (its pages are freed; it is recomputed later)."""
        for slot in sorted(running, key=lambda s: running[s].order):
            if slot not in running:
                continue
            while True:
                try:
                    self.cache.reserve(slot, self.cache.length(slot) + 1)
                    break
                except OutOfBlocksError:
                    victim = max(running, key=lambda s: running[s].order)
                    seq = running.pop(victim)
                    self.cache.close(victim)
                    seq.preemptions += 1
                    self.stats.preemptions += 1
                    pending.appendleft(seq)
                    if victim == slot:
                        break

    def _steps_ahead(self, pending, running) -> int:
        """How many decode steps the next call runs on device: 1 while requests wait (a finished row
        frees its slot for them at once) or when the cache recycles pages (bounded policies, residual
        rings), else as many as every running row still needs (at most MAX_DECODE_STEPS), when
        the pool holds those positions for every row. Rows that stop early (EOS) compute the rest of
        the call's steps into their own pages, which their close frees."""
        cache = self.cache
        if pending or not isinstance(cache.policy, FullPolicy) or cache.layout.has_ring:
            return 1
        steps = min([MAX_DECODE_STEPS] + [seq.request.max_new_tokens - len(seq.generated)
                                           for seq in running.values()])
        if steps <= 1:
            return 1
        try:
            for slot in running:
                cache.reserve(slot, cache.length(slot) + steps)
        except OutOfBlocksError:  # pages reserved so far stay with their rows, used as they grow
            return 1
        return steps

    def _decode(self, running, done, bar, steps: int = 1) -> None:
        cache = self.cache
        s = cache.slots
        tokens = np.zeros(s, np.int32)
        positions = np.zeros(s, np.int32)
        active = np.zeros(s, bool)
        temperature = np.zeros(s, np.float32)
        counters = np.zeros(s, np.int32)
        keys = np.zeros((s, *self._key_shape), np.uint32)
        for slot, seq in running.items():
            tokens[slot] = seq.generated[-1]
            positions[slot] = cache.length(slot)
            active[slot] = True
            temperature[slot] = seq.request.temperature
            counters[slot] = len(seq.generated)
            keys[slot] = np.asarray(seq.key_data)
        start = time.perf_counter()
        chosen, cache.state = decode_steps(
            self.graphdef, self.params, cache.state, cache.spec, jnp.asarray(tokens),
            jnp.asarray(positions), jnp.asarray(active), jnp.asarray(cache.block_tables()),
            jnp.asarray(temperature), jnp.asarray(keys), jnp.asarray(counters), jnp.int32(steps))
        chosen = np.asarray(chosen)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_steps += steps
        for step in range(steps):
            for slot in list(running):  # a row that finishes leaves `running` and takes no later tokens
                seq = running.pop(slot)
                cache.advance(slot, int(positions[slot]) + step + 1)
                self._append(slot, seq, int(chosen[step, slot]), running, done, bar)

    def _append(self, slot, seq: _Sequence, token: int, running, done, bar) -> None:
        if not self.stats.generated_tokens:
            self.stats.first_token_seconds = time.perf_counter() - self._start
        seq.generated.append(token)
        self.stats.generated_tokens += 1
        bar.update(1)
        request = seq.request
        finished = "eos" if request.eos_id is not None and token == request.eos_id else None
        if finished is None and len(seq.generated) >= request.max_new_tokens:
            finished = "length"
        if finished is None:
            running[slot] = seq
            return
        self.cache.close(slot)
        done[seq.index] = Completion(list(seq.generated), finished, len(request.prompt), seq.preemptions)


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                   layout="f32", policy=None, temperature: float = 0.0, key=None,
                   eos_id: int | None = None, slots: int = 8, **cache_options) -> list[list[int]]:
    """Continue several prompts together; request i samples with fold_in(key, i) when temperature > 0.
    Returns the new token ids of each prompt."""
    if temperature > 0 and key is None:
        raise ValueError("key (a jax PRNG key) is required when temperature > 0")
    requests = [Request(p, max_new_tokens, temperature,
                        None if key is None else jax.random.fold_in(key, i), eos_id)
                for i, p in enumerate(prompts)]
    generator = BatchedGenerator(model, layout, policy, slots=slots, **cache_options)
    return [c.tokens for c in generator.generate(requests)]


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, key=None,
             eos_id: int | None = None, layout=None, policy=None,
             timings: dict | None = None) -> np.ndarray:
    """Continue prompt_ids ([seq] or [batch, seq]) by up to max_new_tokens through the model's own
    blocks over a contiguous KV cache (layout: default the model's compute dtype; policy: full).

    temperature 0 is greedy; above 0 samples, row i with fold_in(key, i) for a batch and with key
    itself for one prompt. Returns the new ids ([n] or [batch, n]): a batch stops once every row
    has produced eos_id and pads the rows that ended with eos_id; one prompt ends at its eos_id.
    timings, when given, receives time.perf_counter() stamps "start", "first_token" (the first new
    token is on the host) and "end", the prefill "bucket" length and the cache "layout" name.
    """
    prompt = np.asarray(prompt_ids)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids must be a non-empty integer [seq] or [batch, seq] array, "
                         f"got {prompt.dtype} {np.shape(prompt_ids)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    config = model.config
    if eos_id is not None and not 0 <= eos_id < config.vocab_size:
        raise ValueError(f"eos_id must be None or in [0, vocab_size={config.vocab_size})")
    batch, prompt_len = prompt.shape
    if prompt_len + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"config.max_seq_len ({config.max_seq_len})")
    if max_new_tokens == 0:
        empty = np.zeros((batch, 0), np.int32)
        return empty[0] if squeeze else empty
    if temperature > 0 and key is None:
        raise ValueError("key must be a jax PRNG key when temperature > 0")
    keys = [None if key is None else key if squeeze else jax.random.fold_in(key, i) for i in range(batch)]
    requests = [Request(row, max_new_tokens, temperature, k, eos_id) for row, k in zip(prompt, keys)]
    # Round the cache up so that nearby lengths share the compiled steps.
    max_len = min(config.max_seq_len, -(-(prompt_len + max_new_tokens) // 128) * 128)
    layout = layout or {"bfloat16": "bf16", "float16": "f16"}.get(jnp.dtype(model.dtype).name, "f32")
    generator = BatchedGenerator(model, layout, policy, slots=batch, max_len=max_len, contiguous=True)
    completions = generator.generate(requests)
    if timings is not None:
        timings["start"] = generator._start
        timings["first_token"] = generator._start + generator.stats.first_token_seconds
        timings["end"] = generator._start + generator.stats.seconds
        timings["bucket"] = generator._bucket(prompt_len)
        timings["layout"] = generator.cache.layout.name
    rows = [c.tokens for c in completions]
    if squeeze:
        return np.asarray(rows[0], np.int32)
    width = max(len(r) for r in rows)
    return np.asarray([r + [eos_id] * (width - len(r)) for r in rows], np.int32)
