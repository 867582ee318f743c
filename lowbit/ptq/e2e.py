"""End-to-end training of the quantization scales only (EfficientQAT's E2E-QP) by distillation:
a packed model's group scales are trained so that its next-token distribution matches a teacher's
(KL on the logits); codes, offsets and every other parameter stay exactly as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lowbit.core.quantize import expand_groups, round_to_ste
from lowbit.files import atomic_path, open_stamped_workdir
from lowbit.nn.packed_layer import PackedLayer
from lowbit.ptq.targets import dotted, replace_module

TRAINABLE_KINDS = ("int", "ternary")  # weight = codes x scale (+ offset): a scale is a step size
STATE_FILE = "e2e-state.npz"
SETTINGS_FILE = "e2e-settings.json"


class TrainableScale(nnx.Variable):
    """A packed layer's relative scale change (scale = stored scale x (1 + delta)), trained."""


class FrozenArray(nnx.Variable):
    """A packed layer's codes, starting scales or offsets during E2E training (not trained)."""


@functools.partial(jax.checkpoint, static_argnums=(5, 6))
def _product(rows, codes, base, delta, zero, spec, scale_dtype):
    """rows @ W with W = codes x stored(base (1 + delta)) (+ zero), W recomputed in the backward
    pass (no float copy of the weights is kept between the passes)."""
    k = codes.shape[0]
    scale = round_to_ste(base * (1.0 + delta), scale_dtype)
    matrix = codes.astype(jnp.float32) * expand_groups(scale, spec, 0, k)
    if zero is not None:
        matrix = matrix + expand_groups(zero, spec, 0, k)
    return rows @ matrix.astype(rows.dtype)


class ScaleTrainingLayer(nnx.Module):
    """A packed layer during E2E training: the same function, with its weight rebuilt each call
    from the unpacked codes and a trainable scale; input preparation and bias are the wrapped
    layer's own."""

    def __init__(self, layer: PackedLayer):
        q = layer.weight_qarray()
        stored = layer.scale.get_value()
        if tuple(stored.shape) != tuple(q.scale.shape):
            raise ValueError(f"the packed layer's scale has shape {tuple(stored.shape)}, its "
                             f"codes' groups need {tuple(q.scale.shape)}")
        self.layer = layer
        self.spec = q.spec
        self.scale_dtype = jnp.dtype(stored.dtype)
        self.codes = FrozenArray(jnp.asarray(q.codes, jnp.int8))
        self.base = FrozenArray(q.scale_values())
        zero = q.zero_values()
        self.zero = nnx.data(None if zero is None else FrozenArray(zero))
        self.delta = TrainableScale(jnp.zeros(q.scale.shape, jnp.float32))

    def stored_scale(self) -> jax.Array:
        """The scale the packed layer will hold: base x (1 + delta) in its storage dtype."""
        return (self.base[...] * (1.0 + self.delta[...])).astype(self.scale_dtype)

    @property
    def input_transform(self) -> str | None:
        """The packed layer's, which prepare_rows applies: a caller that leaves its own transform
        to a layer carrying one (the rotation's HadamardMLP) must see it, or it runs twice."""
        return self.layer.input_transform

    def __call__(self, x: jax.Array, *, out_sharding=None) -> jax.Array:
        layer = self.layer
        dtype = layer.dtype or x.dtype
        rows = layer.prepare_rows(layer.contraction.rows(x)).astype(dtype)
        zero = None if self.zero is None else self.zero[...]
        y = _product(rows, self.codes[...], self.base[...], self.delta[...], zero, self.spec,
                     self.scale_dtype)
        if layer.bias is not None:
            y = y + layer.bias[...].astype(dtype)
        return layer.contraction.output(y, x)


def trainable_layers(model: nnx.Module) -> dict[str, PackedLayer]:
    """{path: packed layer} whose weight is codes x scale (+ offset) with plain stored scales
    (int or ternary kinds; no super-block or double-quantized scales), in graph order."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, PackedLayer) and node.spec.kind in TRAINABLE_KINDS \
                and node.scale_spec is None and node.spec.super_block is None:
            found[dotted(path)] = node
    return found


def _check_options(steps, learning_rate, batch_size, checkpoint_every) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size),
                        ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) \
            or not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")


def _check_tokens(calibration, vocab_size: int | None) -> np.ndarray:
    tokens = np.asarray(calibration)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2 or \
            not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"calibration must be int tokens [samples, seq >= 2], got "
                         f"{tokens.dtype} {tokens.shape}")
    if vocab_size is not None and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"calibration tokens must lie in [0, {vocab_size}), got "
                         f"[{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.int32)


def _kl(student_logits, teacher_log_probs):
    """Mean over positions of KL(teacher || student), in nats."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(teacher_log_probs)
    return jnp.mean(jnp.sum(p * (teacher_log_probs - log_q), axis=-1))


@functools.partial(jax.jit, static_argnums=0)
def _teacher_log_probs(graphdef, state, tokens):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens).astype(jnp.float32), axis=-1)


def _loss(trainable, graphdef, rest, tokens, teacher_log_probs):
    return _kl(nnx.merge(graphdef, trainable, rest)(tokens), teacher_log_probs)


@functools.partial(jax.jit, static_argnums=1)
def _evaluate(trainable, graphdef, rest, tokens, teacher_log_probs):
    return _loss(trainable, graphdef, rest, tokens, teacher_log_probs)


@functools.partial(jax.jit, static_argnums=(1, 5))
def _train_step(trainable, graphdef, rest, tokens, teacher_log_probs, optimizer, opt_state):
    loss, grads = jax.value_and_grad(_loss)(trainable, graphdef, rest, tokens, teacher_log_probs)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


@functools.lru_cache(maxsize=8)
def _optimizer(steps: int, learning_rate: float):
    """Adam on the relative scale changes, cosine-decayed rate (cached: jit sees one object)."""
    return optax.adam(optax.cosine_decay_schedule(learning_rate, steps))


def _model_digest(layers: dict[str, PackedLayer]) -> str:
    digest = hashlib.sha256()
    for path, layer in layers.items():
        digest.update(path.encode())
        for variable in (layer.data, layer.scale, layer.zero):
            if variable is not None:
                digest.update(np.asarray(variable.get_value()).tobytes())
    return digest.hexdigest()


class _Checkpoints:
    """One training state file in a work directory stamped with the run's settings."""

    def __init__(self, workdir: str | Path, settings: dict):
        self.folder = open_stamped_workdir(workdir, settings, SETTINGS_FILE, "an E2E run")
        self.path = self.folder / STATE_FILE

    def save(self, step: int, trainable, opt_state, history: dict) -> None:
        arrays = {"step": np.asarray(step), "history": np.asarray(json.dumps(history))}
        for i, leaf in enumerate(jax.tree.leaves(trainable)):
            arrays[f"trainable.{i}"] = np.asarray(leaf)
        for i, leaf in enumerate(jax.tree.leaves(opt_state)):
            arrays[f"opt.{i}"] = np.asarray(leaf)
        with atomic_path(self.path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    def load(self, trainable, opt_state):
        """(step, trainable, opt_state, history) of the saved state, or None."""
        if not self.path.is_file():
            return None
        with np.load(self.path) as data:
            def restore(tree, prefix):
                leaves, treedef = jax.tree.flatten(tree)
                return jax.tree.unflatten(treedef, [jnp.asarray(data[f"{prefix}.{i}"], l.dtype)
                                                    for i, l in enumerate(leaves)])
            return (int(data["step"]), restore(trainable, "trainable"),
                    restore(opt_state, "opt"), json.loads(str(data["history"])))


def e2e_train(model: nnx.Module, teacher: nnx.Module, calibration, *, steps: int = 100,
              learning_rate: float = 1e-3, batch_size: int = 2, workdir: str | Path | None = None,
              checkpoint_every: int = 25, kl_batches: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Trains the scales of every packed int / ternary layer of `model` (see trainable_layers)
    end to end, in place, to minimize KL(teacher || model) over all positions of the calibration
    tokens; nothing else changes (codes and offsets are bit-identical afterwards).

    teacher: a model of the same vocabulary whose logits are the target (e.g. the source GGUF on
      its own Q4_1 blocks, load_gguf_model(path, runtime="packed"): no second float copy).
    calibration: int tokens [samples, seq]; batches of batch_size consecutive samples, one per
      Adam step (cycling); each scale is trained as stored x (1 + delta), delta starting at 0,
      rate learning_rate cosine-decayed over `steps`; the forward pass rounds the scale to its
      storage dtype (f16) with a straight-through gradient, so what is trained is what is saved.
    workdir: a folder for the training state, written every checkpoint_every steps and at the
      end; rerunning with the same settings, model and calibration resumes from it.
    If the mean KL over the first kl_batches calibration batches (None: all) ends above its
    starting value, the starting scales are kept. Returns a report: initial_kl, final_kl, kept_initial, losses (per step),
    steps, resumed_at, layers, seconds.
    """
    _check_options(steps, learning_rate, batch_size, checkpoint_every)
    if kl_batches is not None and (isinstance(kl_batches, bool) or
                                   not isinstance(kl_batches, int) or kl_batches < 1):
        raise ValueError(f"kl_batches must be None or a positive integer, got {kl_batches!r}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    tokens = _check_tokens(calibration, vocab)
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    layers = trainable_layers(model)
    if not layers:
        raise ValueError("model has no packed int or ternary layer with plain scales to train "
                         "(quantize it first, e.g. lowbit.ptq.quantize)")
    start = time.perf_counter()
    checkpoints = None
    if workdir is not None:
        settings = {"steps": steps, "learning_rate": learning_rate, "batch_size": batch_size,
                    "kl_batches": kl_batches,
                    "layers": {p: str(layer.spec) for p, layer in layers.items()},
                    "calibration_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                    "calibration_shape": list(tokens.shape), "model_sha256": _model_digest(layers)}
        checkpoints = _Checkpoints(workdir, settings)
    wrappers = {path: ScaleTrainingLayer(layer) for path, layer in layers.items()}
    teacher_graphdef, teacher_state = nnx.split(teacher)

    def teacher_log_probs(batch):
        return _teacher_log_probs(teacher_graphdef, teacher_state, jnp.asarray(batch))

    try:
        for path, wrapper in wrappers.items():
            replace_module(model, path, wrapper)
        graphdef, trainable, rest = nnx.split(model, TrainableScale, ...)

        def mean_kl(params) -> float:
            return float(np.mean([float(_evaluate(params, graphdef, rest, jnp.asarray(b),
                                                  teacher_log_probs(b)))
                                  for b in batches[:kl_batches]]))

        optimizer = _optimizer(steps, float(learning_rate))
        opt_state = optimizer.init(trainable)
        initial = trainable
        saved = None if checkpoints is None else checkpoints.load(trainable, opt_state)
        if saved is None:
            first, history = 0, {"initial_kl": mean_kl(trainable), "losses": []}
        else:
            first, trainable, opt_state, history = saved
        bar = tqdm(range(first, steps), desc="e2e", unit="step", leave=False,
                   disable=not progress, initial=first, total=steps)
        for step in bar:
            batch = batches[step % len(batches)]
            trainable, opt_state, loss = _train_step(trainable, graphdef, rest,
                                                     jnp.asarray(batch), teacher_log_probs(batch),
                                                     optimizer, opt_state)
            history["losses"].append(float(loss))
            bar.set_postfix(kl=f"{float(loss):.4g}")
            done = step + 1
            if checkpoints is not None and (done % checkpoint_every == 0 or done == steps):
                checkpoints.save(done, trainable, opt_state, history)
        final = mean_kl(trainable)
        kept_initial = not final < history["initial_kl"]
        nnx.update(model, initial if kept_initial else trainable)
        scales = {path: wrapper.stored_scale() for path, wrapper in wrappers.items()}
    finally:
        for path, layer in layers.items():
            replace_module(model, path, layer)
    for path, layer in layers.items():
        layer.scale.set_value(scales[path])
    return {"initial_kl": history["initial_kl"], "final_kl": min(final, history["initial_kl"]),
            "trained_kl": final, "kept_initial": kept_initial, "losses": history["losses"],
            "steps": steps, "resumed_at": first, "layers": len(layers),
            "learning_rate": learning_rate, "batch_size": batch_size, "kl_batches": kl_batches,
            "calibration_shape": list(tokens.shape),
            "seconds": round(time.perf_counter() - start, 2)}

