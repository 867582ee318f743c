"""The QAT training loop: a Llama model converted by quantization rules, AdamW (warmup + cosine,
gradient clipping), periodic held-out evaluation, Orbax checkpoints with exact resume, and data
parallelism over a 'data' mesh axis (parameters replicated, the batch split).
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from lowbit.models.llama import Llama
from lowbit.nn.quant_linear import calibrate
from lowbit.nn.rules import quantize_model
from lowbit.train.checkpoint import CheckpointStore
from lowbit.train.config import TrainConfig, TrainSettings
from lowbit.train.data import batch_at, corpus_tokens, eval_windows

DECAYED = ("kernel", "embedding")
CALIBRATION_ROWS = 4


def lr_schedule(t: TrainSettings) -> optax.Schedule:
    """Linear warmup from 0 to lr over warmup_steps, then cosine decay to min_lr_ratio * lr."""
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
                                              decay_steps=t.steps, end_value=t.lr * t.min_lr_ratio)


def decay_mask(params: Any) -> Any:
    """True for kernels and embeddings (weight decay), False for norms and quantizer values."""
    def decayed(path, _):
        names = [getattr(key, "key", getattr(key, "name", None)) for key in path]
        return any(name in DECAYED for name in names[-2:])
    return jax.tree_util.tree_map_with_path(decayed, params)


class OptimizerKey(NamedTuple):
    """The TrainSettings fields the update rule depends on (a hashable jit-static key; the
    learning rate is a traced argument, so runs that differ only in lr or length share a compile)."""

    weight_decay: float
    grad_clip: float
    b1: float
    b2: float


def optimizer_key(t: TrainSettings) -> OptimizerKey:
    return OptimizerKey(*(getattr(t, name) for name in OptimizerKey._fields))


def make_optimizer(t) -> optax.GradientTransformation:
    """Global-norm clipping (when grad_clip > 0) then AdamW at unit learning rate; the train step
    multiplies the update by lr_schedule(t)(step), which equals optax.adamw on that schedule
    (decoupled weight decay scaled by the lr too). t: TrainSettings or an OptimizerKey."""
    if not isinstance(t, OptimizerKey):
        t = optimizer_key(t)
    adamw = optax.adamw(1.0, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip > 0 else adamw


def next_token_nll(logits, tokens):
    """Per-position -log p(tokens[:, i+1] | tokens[:, :i+1]): [batch, seq - 1] (f32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), tokens[:, 1:])


def _loss(graphdef, params, rest, batch):
    logits = nnx.merge(graphdef, params, rest)(batch)
    return next_token_nll(logits, batch).mean()


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 4))
def _train_step(graphdef, key: OptimizerKey, params, rest, opt_state, batch, lr):
    """One AdamW step at learning rate lr; module-level so that equal models and settings share
    one compilation."""
    tx = make_optimizer(key)
    loss, grads = jax.value_and_grad(_loss, argnums=1)(graphdef, params, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: u * lr, updates))
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@partial(jax.jit, static_argnums=0)
def _eval_step(graphdef, params, rest, batch):
    """Per-window sums of the next-token loss: [batch]."""
    logits = nnx.merge(graphdef, params, rest)(batch)
    return next_token_nll(logits, batch).sum(axis=-1)


def make_mesh(data_parallel: int = 1, devices=None) -> Mesh:
    """A one-axis ('data',) mesh over the first `data_parallel` devices (0: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices) if data_parallel == 0 else data_parallel
    if not 1 <= n <= len(devices):
        raise ValueError(f"data_parallel must be in [0, {len(devices)}] (0 = all devices), got {data_parallel}")
    return Mesh(np.asarray(devices[:n]), ("data",))


# Settings a resumed run may change freely (they decide when to evaluate and checkpoint, or
# where the batch runs); changes to any other setting are refused unless resume="force", and
# changes that give the arrays other shapes or meanings are refused always.
RESUME_FREE = ("train.eval_interval", "train.eval_windows", "train.checkpoint_dir",
               "train.checkpoint_interval", "train.data_parallel")
RESUME_NEVER = ("model.", "quant.", "data.tokenizer")
RESUME_MODES = (True, False, "force")


def _flat_settings(config: dict) -> dict[str, Any]:
    """{"train.lr": 0.001, ...} from a to_dict() table, values as JSON gives them back."""
    plain = json.loads(json.dumps(config))
    return {f"{section}.{key}": value for section, table in plain.items()
            for key, value in (table.items() if isinstance(table, dict) else [("", table)])}


def resume_changes(saved: dict, current: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Every setting that differs between a checkpoint's saved config and `current`:
    {"train.lr": (saved value, current value)}; a key missing on one side shows as None."""
    try:  # fill defaults of settings added since the checkpoint was written
        saved = type(current).from_dict(saved).to_dict()
    except (ValueError, TypeError):
        pass
    old, new = _flat_settings(saved), _flat_settings(current.to_dict())
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)}


class Trainer:
    """One training run of `config`. Build it, then `run()`; with a checkpoint directory that
    already holds checkpoints, the newest is restored first (resume=True) and training continues
    where it stopped, bit for bit. Resuming compares the whole saved config: changed settings
    other than RESUME_FREE are refused (named, old -> new) unless resume="force", and changes
    to the model, quantization or tokenizer always. tokens: optional (train, eval) token streams
    to use instead of the configured corpus. A step whose loss is not finite stops the run with
    a ValueError before anything of it is saved."""

    config_type: type = TrainConfig
    resume_never: tuple = RESUME_NEVER

    def __init__(self, config: TrainConfig, *, tokens: tuple[np.ndarray, np.ndarray] | None = None,
                 devices=None, resume: bool | str = True, progress: bool = False):
        if not isinstance(config, self.config_type):
            raise ValueError(f"config must be a {self.config_type.__name__}, got {type(config).__name__}")
        if not any(resume is mode or resume == mode for mode in RESUME_MODES) or resume in (0, 1) \
                and not isinstance(resume, bool):
            raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
        self.resume_mode = resume
        self.config = config
        t = config.train
        self.progress = progress
        d = config.data
        self.train_tokens, self.eval_tokens = tokens if tokens is not None else corpus_tokens(
            d.corpus, d.tokenizer, d.eval_fraction)
        vocab = d.vocab_size
        for name, stream in (("train", self.train_tokens), ("eval", self.eval_tokens)):
            if stream.size < t.seq_len:
                raise ValueError(f"the {name} stream holds {stream.size} tokens, fewer than seq_len={t.seq_len}")
            if stream.min() < 0 or stream.max() >= vocab:
                raise ValueError(f"{name} tokens must lie in [0, {vocab}) for tokenizer {d.tokenizer!r}")
        self.mesh = make_mesh(t.data_parallel, devices)
        n_dev = self.mesh.devices.size
        if t.batch_size % n_dev:
            raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of the {n_dev} "
                             "data-parallel devices")
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))

        self.store = CheckpointStore(t.checkpoint_dir) if t.checkpoint_dir else None
        restoring = resume and self.store is not None and self.store.latest_step() is not None
        model = self._build_model(vocab, restoring)
        self.graphdef, params, rest = self._split(model)
        self.tx = make_optimizer(t)
        self.schedule = lr_schedule(t)
        self.params = jax.device_put(params, self.replicated)
        self.rest = jax.device_put(rest, self.replicated)
        self.opt_state = jax.device_put(self.tx.init(self.params), self.replicated)
        self.step = 0
        self.history: list[dict] = []
        self.train_losses: list[float] = []
        windows = eval_windows(self.eval_tokens, t.seq_len, t.eval_windows)
        pad = -windows.shape[0] % t.batch_size
        self._eval_real = windows.shape[0]
        self._eval_batches = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)]).reshape(
            -1, t.batch_size, t.seq_len)
        if restoring:
            self.restore()

    # ---- what subclasses (FineTuner) change ---------------------------------------------------
    def _build_model(self, vocab: int, restoring: bool) -> nnx.Module:
        """The model to train: a fresh Llama converted by the quantization rules (calibrated on
        the first batch unless a checkpoint is about to be restored)."""
        t = self.config.train
        model = Llama(self.config.model.llama_config(vocab, t.seq_len), rngs=nnx.Rngs(t.seed))
        self.quantize_report = quantize_model(model, self.config.quant.quant_rules(), raise_on_unmatched=True)
        if not restoring:  # data-set initial values (LSQ input steps, PACT 'data' clips)
            calibrate(model, jnp.asarray(self._batch(0)[:CALIBRATION_ROWS]))
        return model

    def _split(self, model: nnx.Module):
        """(graphdef, trained parameters, everything else)."""
        return nnx.split(model, nnx.Param, ...)

    # ---- data -----------------------------------------------------------------------------
    def _batch(self, step: int) -> np.ndarray:
        t = self.config.train
        return batch_at(self.train_tokens, step, t.batch_size, t.seq_len, t.seed)

    def _put(self, batch: np.ndarray) -> jax.Array:
        return jax.device_put(jnp.asarray(batch), self.batch_sharding)

    # ---- public ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step on the batch of the current step; returns its loss and grad norm."""
        self.params, self.opt_state, metrics = _train_step(
            self.graphdef, optimizer_key(self.config.train), self.params, self.rest, self.opt_state,
            self._put(self._batch(self.step)), jnp.float32(self.schedule(self.step)))
        self.step += 1
        return {k: float(v) for k, v in metrics.items()}

    def evaluate(self) -> dict:
        """Mean next-token loss (nats) and perplexity over the held-out windows."""
        total = 0.0
        for i, batch in enumerate(self._eval_batches):
            sums = np.asarray(_eval_step(self.graphdef, self.params, self.rest, self._put(batch)), np.float64)
            real = min(batch.shape[0], self._eval_real - i * batch.shape[0])
            total += float(sums[:real].sum())
        loss = total / (self._eval_real * (self.config.train.seq_len - 1))
        return {"eval_loss": loss, "eval_ppl": math.exp(loss)}

    def run(self, until_step: int | None = None) -> list[dict]:
        """Train up to `until_step` (default: config.train.steps), evaluating every eval_interval
        steps and at the end, checkpointing every checkpoint_interval steps and at the end.
        Returns the evaluation history (one dict per evaluation)."""
        t = self.config.train
        until = t.steps if until_step is None else until_step
        if not 0 <= until <= t.steps:
            raise ValueError(f"until_step must be in [0, train.steps={t.steps}], got {until_step}")
        tokens_per_step = t.batch_size * t.seq_len
        bar = tqdm(total=until, initial=min(self.step, until), desc="train", unit="step",
                   disable=not self.progress, leave=False)
        start_step, start = self.step, time.perf_counter()
        while self.step < until:
            metrics = self.train_step()
            if not math.isfinite(metrics["loss"]):
                bar.close()
                raise ValueError(f"training diverged: the loss is {metrics['loss']} (not finite at "
                                 f"step {self.step}, lr {t.lr:g}); nothing after step "
                                 f"{self.step - 1} was saved; lower train.lr or check the data")
            self.train_losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            at_end = self.step == t.steps
            if (t.eval_interval and self.step % t.eval_interval == 0) or at_end:
                elapsed = time.perf_counter() - start
                record = {"step": self.step, "train_loss": metrics["loss"],
                          "lr": float(self.schedule(self.step - 1)),
                          "tokens_per_s": (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)}
                record.update(self.evaluate())
                self.history.append(record)
            if self.store is not None and ((t.checkpoint_interval and self.step % t.checkpoint_interval == 0)
                                           or self.step == until):
                self.save()
        bar.close()
        return self.history

    def state(self) -> dict:
        """The array state that a checkpoint holds."""
        return {"params": self.params, "rest": self.rest, "opt_state": self.opt_state}

    def save(self) -> None:
        """Checkpoint the current step (needs train.checkpoint_dir)."""
        if self.store is None:
            raise ValueError("train.checkpoint_dir is empty: no checkpoint directory to save to")
        if not all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(self.params)):
            raise ValueError(f"training diverged: the parameters at step {self.step} are not finite "
                             f"(lr {self.config.train.lr:g}); not saving them over the last good "
                             "checkpoint; lower train.lr or check the data")
        record = {"step": self.step, "config": self.config.to_dict(), "history": self.history,
                  "train_losses": self.train_losses}
        self.store.save(self.step, self.state(), record)

    def restore(self, step: int | None = None) -> int:
        """Load checkpoint `step` (default: the newest); returns the step restored."""
        if self.store is None:
            raise ValueError("train.checkpoint_dir is empty: no checkpoint directory to restore from")
        step = self.store.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint in {self.store.directory}")
        self._check_resume(step)
        state, record = self.store.restore(step, self.state())
        self._set_state(state)
        self.step = int(record["step"])
        self.history = list(record.get("history", []))
        self.train_losses = list(record.get("train_losses", []))
        return self.step

    def _set_state(self, state) -> None:
        """Takes a restored checkpoint's arrays (the layout `state()` saves)."""
        self.params, self.rest, self.opt_state = state["params"], state["rest"], state["opt_state"]

    def _check_resume(self, step: int) -> None:
        """Refuse to resume from a checkpoint written with other settings (see the class)."""
        changes = resume_changes(self.store.read_record(step).get("config", {}), self.config)
        never = [k for k in changes if k.startswith(self.resume_never)]
        forced = [k for k in changes if k not in never and k not in RESUME_FREE]
        if not never and (not forced or self.resume_mode == "force"):
            return
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        where = f"the checkpoint at step {step} in {self.store.directory}"
        if never:
            raise ValueError(f"{where} cannot be restored into this run: {', '.join(never)} changed "
                             f"the model's arrays ({listed}); use another checkpoint_dir or "
                             "start over (--no-resume / resume=False)")
        raise ValueError(f"{where} was written with other settings ({listed}); resuming would "
                         f"mix two runs. Continue anyway with --force (resume='force'), use "
                         "another checkpoint_dir, or start over (--no-resume / resume=False)")

    def model(self) -> nnx.Module:
        """The model with the current parameters (a fresh module; training state is untouched)."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def train(config: TrainConfig, **options) -> Trainer:
    """Build a Trainer for `config` (options as in Trainer), run it to the end, return it."""
    trainer = Trainer(config, **options)
    trainer.run()
    trainer.close()
    return trainer
