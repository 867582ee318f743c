"""The sequential calibration driver shared by the PTQ methods: blocks are processed one after
another, each seeing hidden states produced by the already quantized blocks before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lowbit.ptq.targets import module_at, replace_module, resolve_targets

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
LLAMA_BLOCK_LINEARS = r"layers\.\d+\.(attn|mlp)\.\w+"  # a rule path for every block linear


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


def coprime_stride(tokens: int, sample: int, seq: int) -> int:
    """A stride giving about `sample` of `tokens` flattened rows, coprime with the sequence
    length `seq`, so the sample visits every position (a stride dividing seq would pick the
    same positions of every sequence, e.g. only position 0)."""
    stride = max(1, math.ceil(tokens / sample))
    while stride > 1 and math.gcd(stride, seq) != 1:
        stride += 1
    return stride


def rows_stride(total: int, sample: int, counts) -> int:
    """A stride giving about `sample` of `total` rows, coprime with every batch's row count in
    `counts` (so with each sequence length inside them: the sample visits every position)."""
    stride = max(1, math.ceil(total / sample))
    while stride > 1 and any(math.gcd(stride, int(c)) != 1 for c in counts):
        stride += 1
    return stride


def _count_row(x):
    return jnp.asarray([x.shape[0]], jnp.float32)


BATCH_COUNTS = Statistic("batch_counts", _count_row, "concat")  # rows of each batch


@functools.lru_cache(maxsize=64)
def strided_sample(stride: int) -> Statistic:
    """Every `stride`-th token of each batch's [tokens, features] input, concatenated (one
    object per stride, so jit-compiled statistics plans are reused)."""
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


def llama_block_inputs(model, spec, calibration: Any, batch_size: int) -> tuple[list, list[np.ndarray]]:
    """(targets: every block linear of a Llama with weight spec `spec`, calibration token batches
    of batch_size sequences), after checking the batch size and the tokens."""
    from lowbit.nn import QuantRule

    check_batch_size(batch_size)
    tokens = check_calibration(calibration, model.config)
    targets = resolve_targets(model, QuantRule(path=LLAMA_BLOCK_LINEARS, weight_spec=spec), warn_unmatched=False)
    return targets, [tokens[i:i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


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


# ---- The model-agnostic driver: any NNX model, its blocks through a small protocol ----------


def _identity(batch):
    return batch


def _call_module(module, batch):
    return module(batch)


def _llama_prefix(model, tokens):
    return model.embed_tokens(jnp.asarray(tokens))


def _llama_block(block, x):
    return block(x, _positions(x.shape[1]))


@dataclasses.dataclass(frozen=True)
class ModelBlocks:
    """How the sequential driver walks a model (the protocol a model can provide).

    blocks: (dotted path, module) of each block in execution order; a quantized layer belongs to
      the block whose path prefixes its own ("" holds everything).
    prefix(model, batch): runs the model up to the first block (Llama: the embedding).
    run_block(block, hidden): runs one block on the previous block's output.
    prefix and run_block must be module-level functions (they are static jit arguments). A model
    provides its own through a `ptq_blocks()` method returning a ModelBlocks; the built-in
    Llama uses `llama_blocks`; any other model is one block: prefix is the identity and
    run_block calls the model on the calibration batch.
    """

    blocks: tuple
    prefix: Callable[[Any, Any], Any] = None
    run_block: Callable[[Any, Any], Any] = _call_module

    def block_of(self, path: str) -> int | None:
        """The index of the block holding the layer at `path` (None: outside every block)."""
        for index, (prefix, _) in enumerate(self.blocks):
            if prefix == "" or path.startswith(prefix + "."):
                return index
        return None


def llama_blocks(model) -> ModelBlocks:
    """The built-in Llama's protocol: embed -> layers[i](x, positions)."""
    return ModelBlocks(tuple((f"layers.{i}", block) for i, block in enumerate(model.layers)),
                       _llama_prefix, _llama_block)


def model_blocks(model, blocks: ModelBlocks | None = None) -> ModelBlocks:
    """`blocks` if given, else the model's own `ptq_blocks()`, the Llama protocol for the built-in
    Llama, or the whole model as one block."""
    from lowbit.models.llama import Llama

    if blocks is None:
        if hasattr(model, "ptq_blocks"):
            blocks = model.ptq_blocks()
        elif isinstance(model, Llama):
            blocks = llama_blocks(model)
        else:
            blocks = ModelBlocks((("", model),), None, _call_module)
    if not isinstance(blocks, ModelBlocks) or not blocks.blocks:
        raise ValueError(f"blocks must be a ModelBlocks with at least one block, got {blocks!r}")
    return blocks


class _RowsTap:
    """Stands in for a layer inside a traced block: records the rows its kernel multiplies
    (Contraction.rows of its input), then calls the layer."""

    def __init__(self, inner, store: dict, path: str, contraction):
        self.inner, self.store, self.path, self.contraction = inner, store, path, contraction

    def __call__(self, x, *args, **kwargs):
        self.store[self.path] = (x, self.contraction.rows(x))
        return self.inner(x, *args, **kwargs)


class _OutputTap:
    """Stands in for a module inside a traced block: calls it and records its output."""

    def __init__(self, inner, store: dict, key: str):
        self.inner, self.store, self.key = inner, store, key

    def __call__(self, *args, **kwargs):
        y = self.inner(*args, **kwargs)
        self.store[self.key] = y
        return y


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _tapped_statistics(graphdef, state, hidden, plan, run_block, norms=()):
    """Runs the block on `hidden` and reduces each planned layer's input rows.

    plan: ((local path, Contraction, (Statistic, ...)), ...). Layers fed the very same input
    (q/k/v, gate/up) are reduced once: owner[path] is the plan index whose statistics it shares.
    norms: local paths of norm modules; producer[path] is the index of the norm whose output is
    the very tensor the layer was fed (-1: none).
    """
    block = nnx.merge(graphdef, state)
    store: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for local, contraction, _ in plan:
        replace_module(block, local, _RowsTap(module_at(block, local), store, local, contraction))
    for local in norms:
        replace_module(block, local, _OutputTap(module_at(block, local), outputs, local))
    run_block(block, hidden)
    out, owner, producer = {}, {}, {}
    for index, (local, contraction, stats) in enumerate(plan):
        if local not in store:
            raise ValueError(f"layer {local!r} was not called when its block ran")
        x, rows = store[local]
        first = next(j for j, (other, c, _) in enumerate(plan)
                     if other in store and store[other][0] is x and c == contraction)
        owner[local] = jnp.int32(first)
        producer[local] = jnp.int32(next((j for j, norm in enumerate(norms)
                                          if outputs.get(norm) is x), -1))
        if first == index:
            out[local] = {s.name: s.fn(rows) for s in stats}
    return out, owner, producer


def norm_paths(block) -> tuple[str, ...]:
    """Local paths of the block's norms: modules without a kernel holding a 1-D `scale` or
    `weight` variable (nnx.LayerNorm, nnx.RMSNorm, the Llama's RMSNorm)."""
    found = []
    for path, node in nnx.iter_graph(block):
        if not isinstance(node, nnx.Module) or not path or hasattr(node, "kernel"):
            continue
        vectors = [getattr(node, n, None) for n in ("scale", "weight")]
        if any(isinstance(v, nnx.Variable) and v.get_value() is not None
               and v.get_value().ndim == 1 for v in vectors):
            found.append(".".join(str(p) for p in path))
    return tuple(found)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run_block(graphdef, state, hidden, run_block):
    return run_block(nnx.merge(graphdef, state), hidden)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _run_prefix(graphdef, state, batch, prefix):
    return prefix(nnx.merge(graphdef, state), batch)


def _to_host(tree):
    return jax.tree.map(np.asarray, tree)


@dataclasses.dataclass
class BlockInputs:
    """What a method sees of one block in the model-agnostic driver.

    index / path / block: the block (modify it in place: replace its layers by packed ones);
    targets: {local path within the block: Target}; hidden: the block's inputs, one host pytree
    per calibration batch, produced by the already quantized blocks before it.
    """

    index: int
    path: str
    block: nnx.Module
    targets: dict
    hidden: list
    run_block: Callable
    owners: dict = dataclasses.field(default_factory=dict)
    producers: dict = dataclasses.field(default_factory=dict)

    def statistics(self, stats: tuple[Statistic, ...] | dict[str, tuple[Statistic, ...]]
                   ) -> dict[str, dict[str, Any]]:
        """{local path: {statistic name: value}} of every target's input rows over all batches
        (layers sharing one input share one reduction: the same dict object).

        stats: the statistics of every target, or {local path: statistics} per target (layers
        sharing an input get their first member's). Afterwards `owners` maps each target to the
        first target fed the very same input tensor with the same contraction (itself if none),
        and `producers` to the norm whose output is that tensor (None if none).
        """
        per = stats if isinstance(stats, dict) else {local: tuple(stats)
                                                      for local in self.targets}
        plan = tuple((local, t.contraction, tuple(per[local]))
                     for local, t in self.targets.items())
        graphdef, state = nnx.split(self.block)
        norms = norm_paths(self.block)
        totals: dict[str, dict[str, Any]] = {}
        owners: dict[str, int] = {}
        for batch in self.hidden:
            parts, owner, producer = _tapped_statistics(graphdef, state, batch, plan,
                                                        self.run_block, norms)
            owners = {local: int(i) for local, i in owner.items()}
            self.producers = {local: norms[int(i)] if int(i) >= 0 else None
                              for local, i in producer.items()}
            for local, values in parts.items():
                current = totals.setdefault(local, {s.name: None for s in per[local]})
                for s in per[local]:
                    current[s.name] = _combine(s.combine, current[s.name], values[s.name])
        self.owners = {local: plan[owners[local]][0] for local in self.targets}
        return {local: totals[self.owners[local]] for local in self.targets}

    def output(self, batch: int = 0) -> Any:
        """The block's output for calibration batch `batch`, with its current weights."""
        graphdef, state = nnx.split(self.block)
        return _run_block(graphdef, state, self.hidden[batch], self.run_block)


def check_batches(calibration) -> list:
    """A non-empty list of calibration batches (each is what the model's __call__ takes)."""
    if calibration is None:
        raise ValueError("calibration is required for this method: a list of batches, each "
                         "what the model's __call__ takes")
    if isinstance(calibration, (np.ndarray, jax.Array)) or not isinstance(calibration,
                                                                            (list, tuple)):
        raise ValueError(f"calibration must be a list of batches (each what the model's "
                         f"__call__ takes), got {type(calibration).__name__}; wrap one batch "
                         "as [batch]")
    if not calibration:
        raise ValueError("calibration is an empty list; give at least one batch")
    return list(calibration)


def run_blocks(model, targets, calibration, process: Callable[[BlockInputs], Any], *,
               blocks: ModelBlocks | None = None, progress: bool = True,
               desc: str = "quantize") -> list[Any]:
    """Calls process on every block holding targets, in order, and returns what it returned.

    targets: the Targets of the run (lowbit.ptq.targets.resolve_targets); calibration: a list
    of batches. Each block sees the outputs of the blocks before it after they were quantized;
    a target outside every block is a ValueError (its inputs are never produced).
    """
    walk = model_blocks(model, blocks)
    batches = check_batches(calibration)
    per_block: dict[int, dict[str, Any]] = {}
    for target in targets:
        index = walk.block_of(target.path)
        if index is None:
            raise ValueError(f"layer {target.path!r} lies outside the model's blocks "
                             f"{[p for p, _ in walk.blocks][:4]}...; a calibrated method cannot "
                             "see its inputs: exclude it with the rules or pass blocks=")
        prefix = walk.blocks[index][0]
        local = target.path[len(prefix) + 1:] if prefix else target.path
        per_block.setdefault(index, {})[local] = target
    if walk.prefix is None:
        hidden = batches
    else:
        graphdef, state = nnx.split(model)
        hidden = [_to_host(_run_prefix(graphdef, state, b, walk.prefix)) for b in batches]
    last = max(per_block)
    results = []
    bar = tqdm(walk.blocks[:last + 1], desc=desc, unit="block", disable=not progress,
               leave=False)
    for index, (path, block) in enumerate(bar):
        if index in per_block:
            results.append(process(BlockInputs(index, path, block, per_block[index], hidden,
                                               walk.run_block)))
        if index < last:
            graphdef, state = nnx.split(block)
            hidden = [_to_host(_run_block(graphdef, state, h, walk.run_block)) for h in hidden]
    return results
