"""The one scorer: perplexity, KL(reference || model) and top-1 agreement over non-overlapping
token windows, under a named convention (SCORES); log-softmax is f32.
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

# "all": every position after the first of a window (the GPTQ convention, lowbit's default);
# "second-half": only the second half of each window, as llama.cpp's llama-perplexity scores it
# (logits at positions ctx//2 .. ctx-2 predicting tokens ctx//2+1 .. ctx-1).
SCORES = ("all", "second-half")


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    return score


def first_scored(ctx: int, score: str = "all") -> int:
    """The first logit position of a ctx-token window that the convention scores."""
    return 0 if check_score(score) == "all" else ctx // 2


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll is the mean negative log-likelihood (nats) per scored token."""

    ppl: float
    nll: float
    tokens_scored: int
    windows: int
    score: str = "all"


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
    score: str = "all"


def position_sums(log_probs, targets, weight, ref_log_probs=None):
    """Weighted sums over positions: [nll, ref_nll, kl, top1, count] (f32 [5]).

    log_probs, ref_log_probs: [..., n, vocab] normalized log-probabilities (ref optional: then
    ref_nll, kl and top1 are 0); targets: int [..., n] (the token each position predicts);
    weight: [..., n] (0 leaves a position out). KL is KL(ref || model).
    """
    weight = weight.astype(jnp.float32)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    sums = [(nll * weight).sum()]
    if ref_log_probs is None:
        sums += [jnp.zeros(()), jnp.zeros(()), jnp.zeros(())]
    else:
        ref_nll = -jnp.take_along_axis(ref_log_probs, targets[..., None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(ref_log_probs) * (ref_log_probs - log_probs), axis=-1)
        agree = jnp.argmax(log_probs, axis=-1) == jnp.argmax(ref_log_probs, axis=-1)
        sums += [(ref_nll * weight).sum(), (kl * weight).sum(), (agree * weight).sum()]
    return jnp.stack(sums + [weight.sum()])


def summarize_sums(sums) -> dict[str, float]:
    """{"ppl", "ref_ppl", "kl", "top1", "tokens"} from position_sums totals (any float array)."""
    nll, ref_nll, kl, top1, count = (float(v) for v in np.asarray(sums, np.float64))
    if count <= 0:
        raise ValueError("no position was scored")
    return {"ppl": math.exp(nll / count), "ref_ppl": math.exp(ref_nll / count),
            "kl": kl / count, "top1": top1 / count, "tokens": int(round(count))}


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
    """Yields ([batch_size, ctx] windows, [batch_size] row weights); the last batch is padded by
    repeating its first row, with weight 0, so that every call has the same shape."""
    for start in range(0, blocks.shape[0], batch_size):
        chunk = blocks[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        yield jnp.asarray(chunk), jnp.asarray(np.arange(batch_size) < real, jnp.float32)


def _check_vocab(model: Any, blocks: np.ndarray, argument: str) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (blocks.min() < 0 or blocks.max() >= vocab):
        raise ValueError(f"tokens must lie in [0, {argument}.config.vocab_size={vocab})")


def _log_probs(graphdef, state, tokens, first):
    """log-softmax (f32) of the logits at positions first .. seq-2: [batch, seq-1-first, vocab]."""
    logits = nnx.merge(graphdef, state)(tokens)[:, first:-1].astype(jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _window_sums(graphdef, state, tokens, rows, first):
    log_probs = _log_probs(graphdef, state, tokens, first)
    targets = tokens[:, first + 1:]
    return position_sums(log_probs, targets, jnp.broadcast_to(rows[:, None], targets.shape))


@functools.partial(jax.jit, static_argnums=(0, 2, 6))
def _pair_sums(graphdef, state, ref_graphdef, ref_state, tokens, rows, first):
    log_probs = _log_probs(graphdef, state, tokens, first)
    ref_log_probs = _log_probs(ref_graphdef, ref_state, tokens, first)
    targets = tokens[:, first + 1:]
    return position_sums(log_probs, targets, jnp.broadcast_to(rows[:, None], targets.shape),
                         ref_log_probs)


def perplexity(model: nnx.Module, tokens: Any, ctx: int = 512, windows: int | None = None,
               batch_size: int = 1, progress: bool = False,
               score: str = "all") -> PerplexityResult:
    """Perplexity of model (tokens [batch, seq] -> logits [batch, seq, vocab]) over the first
    `windows` (default: all) non-overlapping windows of ctx tokens from a 1-D token array.

    score "all" scores ctx - 1 positions per window, "second-half" ctx - 1 - ctx // 2 (SCORES);
    the forward is jit-compiled once for [batch_size, ctx].
    """
    first = first_scored(ctx, score)
    blocks = _windows(tokens, ctx, windows, batch_size)
    _check_vocab(model, blocks, "model")
    graphdef, state = nnx.split(model)
    totals = np.zeros(5, np.float64)
    with tqdm(total=blocks.shape[0], desc="perplexity", unit="window", disable=not progress,
              leave=False) as bar:
        for batch, rows in _batches(blocks, batch_size):
            totals += np.asarray(_window_sums(graphdef, state, batch, rows, first), np.float64)
            bar.update(int(rows.sum()))
    result = summarize_sums(totals)
    return PerplexityResult(ppl=result["ppl"], nll=math.log(result["ppl"]),
                            tokens_scored=result["tokens"], windows=blocks.shape[0], score=score)


def kl_divergence(model: nnx.Module, ref_model: nnx.Module, tokens: Any, ctx: int = 512,
                  windows: int | None = None, batch_size: int = 1,
                  progress: bool = False, score: str = "all") -> KLResult:
    """Mean KL(ref_model || model) per scored position, top-1 agreement and both perplexities,
    over the same windows and positions as perplexity(). Both models' logits are computed window
    batch by window batch and reduced at once; no logits are kept."""
    first = first_scored(ctx, score)
    blocks = _windows(tokens, ctx, windows, batch_size)
    _check_vocab(model, blocks, "model")
    _check_vocab(ref_model, blocks, "ref_model")
    graphdef, state = nnx.split(model)
    ref_graphdef, ref_state = nnx.split(ref_model)
    totals = np.zeros(5, np.float64)
    with tqdm(total=blocks.shape[0], desc="kl", unit="window", disable=not progress,
              leave=False) as bar:
        for batch, rows in _batches(blocks, batch_size):
            totals += np.asarray(_pair_sums(graphdef, state, ref_graphdef, ref_state, batch,
                                            rows, first), np.float64)
            bar.update(int(rows.sum()))
    r = summarize_sums(totals)
    return KLResult(kl=r["kl"], top1=r["top1"], ppl=r["ppl"], ref_ppl=r["ref_ppl"],
                    tokens_scored=r["tokens"], windows=blocks.shape[0], score=score)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _reference_window(graphdef, state, tokens, first):
    log_probs = _log_probs(graphdef, state, tokens, first)
    targets = tokens[:, first + 1:]
    return log_probs, position_sums(log_probs, targets, jnp.ones(targets.shape))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _against_reference(graphdef, state, tokens, reference, first):
    ref = reference.astype(jnp.float32)
    ref = ref - jax.nn.logsumexp(ref, axis=-1, keepdims=True)  # renormalize after storage
    targets = tokens[:, first + 1:]
    return position_sums(_log_probs(graphdef, state, tokens, first), targets,
                         jnp.ones(targets.shape), ref)


class ReferenceScorer:
    """Perplexity, KL(reference || model) and top-1 agreement of many models on fixed windows,
    with the reference's log-probabilities computed once and kept on the host in `dtype`
    (float16: windows * scored positions * vocab * 2 bytes, 0.2 GB for 4 windows of 512 over
    49152 tokens; float32 keeps them exact).

    tokens: 1-D tokens; the first `windows` non-overlapping windows of ctx are scored under the
    convention `score` (SCORES).
    """

    def __init__(self, reference_model, tokens, ctx: int = 512, windows: int = 4,
                 progress: bool = False, score: str = "all", dtype=jnp.float16):
        self.first = first_scored(ctx, score)
        self.score_convention = score
        self.windows = _windows(tokens, ctx, windows, 1)
        _check_vocab(reference_model, self.windows, "reference_model")
        graphdef, state = nnx.split(reference_model)
        self.reference = []
        totals = np.zeros(5, np.float64)
        for window in tqdm(self.windows, desc="reference", disable=not progress, leave=False):
            log_probs, sums = _reference_window(graphdef, state, jnp.asarray(window[None]),
                                                self.first)
            self.reference.append(np.asarray(log_probs.astype(dtype)))
            totals += np.asarray(sums, np.float64)
        self.ref_ppl = summarize_sums(totals)["ppl"]

    def score(self, model, progress: bool = False) -> dict[str, float]:
        """{"ppl", "kl", "top1", "ref_ppl"} of model on the windows."""
        _check_vocab(model, self.windows, "model")
        graphdef, state = nnx.split(model)
        totals = np.zeros(5, np.float64)
        for window, reference in tqdm(list(zip(self.windows, self.reference)), desc="score",
                                      disable=not progress, leave=False):
            totals += np.asarray(_against_reference(graphdef, state, jnp.asarray(window[None]),
                                                    jnp.asarray(reference), self.first),
                                 np.float64)
        result = summarize_sums(totals)
        return {"ppl": result["ppl"], "kl": result["kl"], "top1": result["top1"],
                "ref_ppl": self.ref_ppl}
