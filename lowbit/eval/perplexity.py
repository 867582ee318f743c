"""Perplexity and KL divergence against a reference model over non-overlapping token windows.

Every position after the first of a window is scored (the GPTQ convention); log-softmax is f32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll is the mean negative log-likelihood (nats) per scored token."""

    ppl: float
    nll: float
    tokens_scored: int
    windows: int


@dataclasses.dataclass(frozen=True)
class KLResult:
    """kl: mean KL(ref || model) in nats per scored position; top1: fraction of positions where
    both argmaxes agree; ppl / ref_ppl: each model's perplexity on the same positions."""

    kl: float
    top1: float
    ppl: float
    ref_ppl: float
    tokens_scored: int
    windows: int


def _windows(tokens: Any, ctx: int, windows: int | None, batch_size: int) -> np.ndarray:
    """Splits a 1-D token array into [n, ctx] non-overlapping windows (the tail is dropped)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    available = tokens.shape[0] // ctx
    if available == 0:
        raise ValueError(f"tokens ({tokens.shape[0]}) are fewer than one window of ctx={ctx}")
    if windows is None:
        windows = available
    elif isinstance(windows, bool) or not isinstance(windows, int) \
            or not 1 <= windows <= available:
        raise ValueError(f"windows must be None or an integer in [1, {available}] "
                         f"(tokens // ctx), got {windows!r}")
    return tokens[: windows * ctx].reshape(windows, ctx).astype(np.int32)


def _batches(blocks: np.ndarray, batch_size: int):
    """Yields ([batch_size, ctx] windows, number of real rows); the last batch is padded by
    repeating its first row so that every call has the same shape (one compilation)."""
    for start in range(0, blocks.shape[0], batch_size):
        chunk = blocks[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        yield jnp.asarray(chunk), real


def _check_vocab(model: Any, blocks: np.ndarray, argument: str) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (blocks.min() < 0 or blocks.max() >= vocab):
        raise ValueError(f"tokens must lie in [0, {argument}.config.vocab_size={vocab})")


def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens).astype(jnp.float32)


def _target_log_probs(logits, log_normalizer, tokens):
    """log p(tokens[:, i+1] | tokens[:, :i+1]) for i < seq - 1: [batch, seq - 1]."""
    picked = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return picked - log_normalizer[:, :-1]


@functools.partial(jax.jit, static_argnums=(0,))
def _window_nll(graphdef, state, tokens):
    """Per-window sums of -log p(next token): [batch]."""
    logits = _logits(graphdef, state, tokens)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return -_target_log_probs(logits, lse, tokens).sum(axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _window_kl(graphdef, state, ref_graphdef, ref_state, tokens):
    """Per-window sums of KL(ref || model), top-1 agreements, model NLL and reference NLL."""
    logits = _logits(graphdef, state, tokens)
    ref_logits = _logits(ref_graphdef, ref_state, tokens)
    lse = jax.nn.logsumexp(logits, axis=-1)
    ref_lse = jax.nn.logsumexp(ref_logits, axis=-1)
    log_ref = ref_logits - ref_lse[..., None]
    kl = jnp.sum(jnp.exp(log_ref) * (log_ref - (logits - lse[..., None])), axis=-1)
    agree = jnp.argmax(logits, axis=-1) == jnp.argmax(ref_logits, axis=-1)
    nll = -_target_log_probs(logits, lse, tokens).sum(axis=-1)
    ref_nll = -_target_log_probs(ref_logits, ref_lse, tokens).sum(axis=-1)
    return kl[:, :-1].sum(axis=-1), agree[:, :-1].sum(axis=-1), nll, ref_nll


def perplexity(model: nnx.Module, tokens: Any, ctx: int = 512, windows: int | None = None,
               batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Perplexity of model (tokens [batch, seq] -> logits [batch, seq, vocab]) over the first
    `windows` (default: all) non-overlapping windows of ctx tokens from a 1-D token array.

    Each window scores ctx - 1 positions; the forward is jit-compiled once for [batch_size, ctx].
    """
    blocks = _windows(tokens, ctx, windows, batch_size)
    _check_vocab(model, blocks, "model")
    graphdef, state = nnx.split(model)
    total = 0.0
    with tqdm(total=blocks.shape[0], desc="perplexity", unit="window", disable=not progress,
              leave=False) as bar:
        for batch, real in _batches(blocks, batch_size):
            sums = np.asarray(_window_nll(graphdef, state, batch), np.float64)[:real]
            total += float(sums.sum())
            bar.update(real)
    scored = blocks.shape[0] * (ctx - 1)
    nll = total / scored
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens_scored=scored,
                            windows=blocks.shape[0])


def kl_divergence(model: nnx.Module, ref_model: nnx.Module, tokens: Any, ctx: int = 512,
                  windows: int | None = None, batch_size: int = 1,
                  progress: bool = False) -> KLResult:
    """Mean KL(ref_model || model) per scored position, top-1 agreement and both perplexities,
    over the same windows and positions as perplexity(). Both models' logits are computed window
    batch by window batch and reduced at once; no logits are kept."""
    blocks = _windows(tokens, ctx, windows, batch_size)
    _check_vocab(model, blocks, "model")
    _check_vocab(ref_model, blocks, "ref_model")
    graphdef, state = nnx.split(model)
    ref_graphdef, ref_state = nnx.split(ref_model)
    totals = np.zeros(4, np.float64)
    with tqdm(total=blocks.shape[0], desc="kl", unit="window", disable=not progress,
              leave=False) as bar:
        for batch, real in _batches(blocks, batch_size):
            parts = _window_kl(graphdef, state, ref_graphdef, ref_state, batch)
            totals += [float(np.asarray(p, np.float64)[:real].sum()) for p in parts]
            bar.update(real)
    scored = blocks.shape[0] * (ctx - 1)
    kl, agree, nll, ref_nll = totals / scored
    return KLResult(kl=float(kl), top1=float(agree), ppl=math.exp(nll), ref_ppl=math.exp(ref_nll),
                    tokens_scored=scored, windows=blocks.shape[0])
