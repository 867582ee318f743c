"""The sequential calibration driver shared by the PTQ methods: blocks are processed one after
another, each seeing hidden states produced by the already quantized blocks before it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

# The linears of a Llama block, grouped by the input they share (a group's first member is
# where its input is captured).
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("attn.wq", "attn.wk", "attn.wv"),
    "attn_out": ("attn.wo",),
    "mlp_in": ("mlp.w_gate", "mlp.w_up"),
    "mlp_hidden": ("mlp.w_down",),
}
LINEAR_NAMES: tuple[str, ...] = tuple(n for names in INPUT_GROUPS.values() for n in names)
GROUP_OF: dict[str, str] = {n: g for g, names in INPUT_GROUPS.items() for n in names}
COMBINES = ("sum", "max", "concat")


def module_at(root: Any, path: str) -> Any:
    """The submodule at a dotted path ("layers.3.attn.wq"); integers index lists."""
    node = root
    for part in path.split("."):
        try:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        except (AttributeError, IndexError, TypeError):
            raise ValueError(f"no module at path {path!r} (failed at {part!r})") from None
    return node


def replace_module(root: Any, path: str, module: Any) -> None:
    """Puts `module` at a dotted path, replacing what was there."""
    parent_path, _, last = path.rpartition(".")
    parent = module_at(root, parent_path) if parent_path else root
    if last.isdigit():
        parent[int(last)] = module
    elif hasattr(parent, last):
        setattr(parent, last, module)
    else:
        raise ValueError(f"no module at path {path!r}")


def linear_paths(n_layers: int) -> list[str]:
    """Dotted paths of every block linear, in model order."""
    return [f"layers.{i}.{name}" for i in range(n_layers) for name in LINEAR_NAMES]


@dataclasses.dataclass(frozen=True)
class Statistic:
    """A reduction of a linear input x: [tokens, features] -> pytree, combined over batches.

    combine: "sum" (adds), "max" (elementwise maximum) or "concat" (concatenates axis 0).
    Instances are hashable (fn must be a module-level function or a functools.partial of one).
    """

    name: str
    fn: Callable[[jax.Array], Any]
    combine: str = "sum"

    def __post_init__(self):
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")


def _xtx(x):
    return jnp.einsum("ti,tj->ij", x, x, preferred_element_type=jnp.float32)


def _abs_sum(x):
    return jnp.abs(x).astype(jnp.float32).sum(axis=0)


def _abs_max(x):
    return jnp.abs(x).astype(jnp.float32).max(axis=0)


def _count(x):
    return jnp.asarray(x.shape[0], jnp.float32)


def _strided_rows(x, stride: int):
    return x[::stride].astype(jnp.float32)


XTX = Statistic("xtx", _xtx, "sum")  # sum of x^T x: [features, features]
ABS_SUM = Statistic("abs_sum", _abs_sum, "sum")  # sum of |x| per feature
ABS_MAX = Statistic("abs_max", _abs_max, "max")  # max of |x| per feature
COUNT = Statistic("count", _count, "sum")  # number of tokens


def strided_sample(stride: int) -> Statistic:
    """Every `stride`-th token of each batch's [tokens, features] input, concatenated."""
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    return Statistic(f"rows_every_{stride}", functools.partial(_strided_rows, stride=stride),
                     "concat")


MAX_TOKEN_SHARE = 0.5  # the most frequent token of ordinary text is a few percent


def check_calibration(tokens: Any, config) -> np.ndarray:
    """Validates calibration tokens: a non-empty int array [samples, seq] with 2 <= seq <=
    max_seq_len, ids inside the vocabulary, and no single id above MAX_TOKEN_SHARE of them
    (text that tokenizes to one id, such as NUL bytes, calibrates nothing useful)."""
    if tokens is None:
        raise ValueError("calibration tokens are required for this method, got None")
    array = np.asarray(tokens)
    if array.ndim != 2:
        raise ValueError(f"calibration tokens must be an integer array [samples, seq], got shape "
                         f"{array.shape}")
    if array.shape[0] == 0 or array.size == 0:
        raise ValueError(f"calibration tokens are empty (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"calibration tokens must be integers, got dtype {array.dtype}")
    if array.shape[1] < 2:
        raise ValueError(f"calibration sequences are too short: {array.shape[1]} tokens each, "
                         "need at least 2")
    if array.shape[1] > config.max_seq_len:
        raise ValueError(f"calibration sequences of {array.shape[1]} tokens exceed the model's "
                         f"max_seq_len {config.max_seq_len}")
    if array.min() < 0 or array.max() >= config.vocab_size:
        raise ValueError(f"calibration tokens must lie in [0, vocab_size={config.vocab_size})")
    ids, counts = np.unique(array, return_counts=True)
    share = counts.max() / array.size
    if share > MAX_TOKEN_SHARE:
        raise ValueError(f"calibration tokens are mostly one token: token id {ids[counts.argmax()]} is "
                         f"{share:.0%} of the calibration tokens (over {MAX_TOKEN_SHARE:.0%}), e.g. "
                         "a file of NUL bytes or one repeated character; calibrate on ordinary text")
    return array.astype(np.int32)


class _Tap:
    """Stands in for a linear inside a traced block: records its input, then calls it."""

    def __init__(self, inner, store: dict, key: str):
        self.inner, self.store, self.key = inner, store, key

    def __call__(self, x):
        self.store[self.key] = x
        return self.inner(x)


def _positions(seq: int) -> jax.Array:
    return jnp.arange(seq, dtype=jnp.int32)[None, :]


@functools.partial(jax.jit, static_argnums=0)
def _block_forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x, _positions(x.shape[1]))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _block_captures(graphdef, state, x, plan):
    """Runs the block on x: [batch, seq, d] and reduces each planned group's linear input.

    plan: ((group, (Statistic, ...)), ...). Returns {group: {stat name: value}}.
    """
    block = nnx.merge(graphdef, state)
    store: dict[str, jax.Array] = {}
    for group, _ in plan:
        first = INPUT_GROUPS[group][0]
        replace_module(block, first, _Tap(module_at(block, first), store, group))
    block(x, _positions(x.shape[1]))
    out = {}
    for group, stats in plan:
        captured = store[group]
        flat = captured.reshape(-1, captured.shape[-1])
        out[group] = {s.name: s.fn(flat) for s in stats}
    return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def _block_inputs(graphdef, state, x, groups):
    """The raw inputs [batch, seq, features] of the given groups' linears for x."""
    block = nnx.merge(graphdef, state)
    store: dict[str, jax.Array] = {}
    for group in groups:
        first = INPUT_GROUPS[group][0]
        replace_module(block, first, _Tap(module_at(block, first), store, group))
    block(x, _positions(x.shape[1]))
    return {group: store[group] for group in groups}


def _combine(kind: str, old, new):
    if old is None:
        return new
    if kind == "sum":
        return jax.tree.map(jnp.add, old, new)
    if kind == "max":
        return jax.tree.map(jnp.maximum, old, new)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), old, new)


@dataclasses.dataclass
class BlockCalibration:
    """What a method sees of one block.

    index: the block's position; block: the module (modify it in place);
    inputs: [samples, seq, d_model] f32 hidden states entering the block, produced by the
    already quantized blocks before it; batch_size: sequences per jit-compiled call.
    """

    index: int
    block: nnx.Module
    inputs: np.ndarray
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.inputs.shape[0] * self.inputs.shape[1]

    def batches(self, sequences: int | None = None) -> Iterator[jax.Array]:
        """The block inputs in batches of batch_size sequences ([b, seq, d]), the first
        `sequences` of them (default all)."""
        n = self.inputs.shape[0] if sequences is None else min(sequences, self.inputs.shape[0])
        for start in range(0, n, self.batch_size):
            yield jnp.asarray(self.inputs[start:min(start + self.batch_size, n)])

    def statistics(self, plan: dict[str, tuple[Statistic, ...]]) -> dict[str, dict[str, Any]]:
        """Reductions of each group's linear input over all calibration tokens.

        plan: {group: (Statistic, ...)} with groups from INPUT_GROUPS. One pass over the
        calibration data; the block runs with its current weights.
        """
        for group in plan:
            if group not in INPUT_GROUPS:
                raise ValueError(f"unknown input group {group!r}; expected one of "
                                 f"{tuple(INPUT_GROUPS)}")
        frozen = tuple((g, tuple(stats)) for g, stats in plan.items())
        graphdef, state = nnx.split(self.block)
        totals: dict[str, dict[str, Any]] = {g: {s.name: None for s in st} for g, st in frozen}
        for x in self.batches():
            parts = _block_captures(graphdef, state, x, frozen)
            for group, stats in frozen:
                for s in stats:
                    totals[group][s.name] = _combine(s.combine, totals[group][s.name],
                                                     parts[group][s.name])
        return totals

    def linear_inputs(self, groups: tuple[str, ...], sequences: int) -> dict[str, jax.Array]:
        """The inputs [sequences, seq, features] of the given groups for the first
        `sequences` calibration sequences (kept in memory: use a few)."""
        groups = tuple(groups)
        graphdef, state = nnx.split(self.block)
        parts: dict[str, list] = {g: [] for g in groups}
        for x in self.batches(sequences):
            for group, value in _block_inputs(graphdef, state, x, groups).items():
                parts[group].append(value)
        return {g: jnp.concatenate(v, axis=0) for g, v in parts.items()}


def embed_calibration(model, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """The embedded calibration tokens: [samples, seq, d_model] f32 (host memory)."""
    out = np.empty((*tokens.shape, model.config.d_model), np.float32)
    for start in range(0, tokens.shape[0], batch_size):
        chunk = jnp.asarray(tokens[start:start + batch_size])
        out[start:start + chunk.shape[0]] = np.asarray(model.embed_tokens(chunk), np.float32)
    return out


def block_forward(block: nnx.Module, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Runs a block over [samples, seq, d] hidden states in batches: [samples, seq, d] f32."""
    graphdef, state = nnx.split(block)
    out = np.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        x = jnp.asarray(inputs[start:start + batch_size])
        out[start:start + x.shape[0]] = np.asarray(_block_forward(graphdef, state, x))
    return out


def merge_blocks(results) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(linears, block reports) from run_sequential's per-block (linears, report) pairs."""
    linears: dict[str, Any] = {}
    reports = []
    for block_linears, report in results:
        linears.update(block_linears)
        reports.append(report)
    return linears, reports


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def run_sequential(model, calibration: Any,
                   process_block: Callable[[BlockCalibration], Any], *, batch_size: int = 8,
                   progress: bool = True, desc: str = "quantize") -> list[Any]:
    """Calls process_block on each block in order and returns what it returned.

    calibration: int tokens [samples, seq]. Each block sees the hidden states produced by the
    blocks before it *after* they were processed (quantized); after process_block returns, the
    block is run to produce the next block's inputs. Only one block's hidden states (plus the
    next ones being written) are held in memory.
    """
    tokens = check_calibration(calibration, model.config)
    check_batch_size(batch_size)
    hidden = embed_calibration(model, tokens, batch_size)
    results = []
    bar = tqdm(model.layers, desc=desc, unit="block", disable=not progress, leave=False)
    for index, block in enumerate(bar):
        context = BlockCalibration(index=index, block=block, inputs=hidden,
                                   batch_size=batch_size)
        results.append(process_block(context))
        hidden = block_forward(block, hidden, batch_size)
    return results
