"""Fine-tuning a pretrained model on the training loop: QLoRA (adapters on a frozen packed NF4
base), LoRA on the float base, or full float fine-tuning; checkpoints hold the trained state alone
(the base is rebuilt from the model source), so resuming is exact and cheap.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowbit.core.spec import QuantSpec
from lowbit.files import read_toml
from lowbit.models.llama import Llama
from lowbit.nn.gguf_layers import GgufEmbed
from lowbit.nn.lora import (BLOCK_LINEARS, INITS, LoRAConfig, LoRAParam, add_lora, holds_foreign_blocks,
                             prepare_qlora)
from lowbit.train.config import DataSettings, TrainSettings, sections_from_dict
from lowbit.train.loop import RESUME_NEVER, OptimizerKey, Trainer, make_optimizer, next_token_nll, optimizer_key

METHODS = ("lora", "full")
FLOAT_BASE = "float"
# A fine-tune's defaults where they differ from training from scratch: short, small batches,
# a LoRA-sized learning rate, no weight decay, one evaluation at the end.
FINETUNE_TRAIN_DEFAULTS = {"steps": 100, "batch_size": 4, "seq_len": 128, "lr": 1e-3, "weight_decay": 0.0,
                           "eval_interval": 0, "eval_windows": 16}


@dataclasses.dataclass(frozen=True)
class SourceSettings:
    """name: a registered model ("smollm2-135m") or a llama GGUF path, loaded in f32."""

    name: str = "smollm2-135m"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"model.name must be a registered model name or a GGUF path, got {self.name!r}")


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """method "lora": adapters of `rank` (scale alpha / rank, input dropout) on the layers whose
    path matches `path`, over a base quantized with `base` (a weight spec; QLoRA: "nf4:g64:dq")
    or kept "float"; only the adapters train. method "full": every float parameter trains (no
    adapters; base must be "float"). init "zero" or "loftq" (quantized bases only)."""

    method: str = "lora"
    base: str = "nf4:g64:dq"
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    path: str = BLOCK_LINEARS
    init: str = "zero"
    loftq_iterations: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"lora.method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.base, str):
            raise ValueError(f"lora.base must be {FLOAT_BASE!r} or a weight spec string, got {self.base!r}")
        if self.base != FLOAT_BASE:
            try:
                spec = QuantSpec.parse(self.base)
            except ValueError as error:
                raise ValueError(f"lora.base must be {FLOAT_BASE!r} or a weight spec string "
                                 f"(e.g. 'nf4:g64:dq'): {error}") from None
            if spec.granularity == "token":
                raise ValueError(f"lora.base {self.base!r} uses token granularity, which is for activations")
        if self.method == "full" and self.base != FLOAT_BASE:
            raise ValueError(f"lora.method 'full' trains the float weights: lora.base must be {FLOAT_BASE!r}, "
                             f"got {self.base!r}")
        if self.init not in INITS:
            raise ValueError(f"lora.init must be one of {INITS}, got {self.init!r}")
        if self.init == "loftq" and self.base == FLOAT_BASE:
            raise ValueError("lora.init 'loftq' corrects a quantized base's error; a float base has none")
        try:
            self.lora_config()
        except ValueError as error:
            raise ValueError(f"lora.{error}") from None

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(path=self.path, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          init=self.init, loftq_iterations=self.loftq_iterations)


FINETUNE_SECTIONS = {"model": SourceSettings, "data": DataSettings, "train": TrainSettings, "lora": LoRASettings}
SECTION_DEFAULTS = {"data": {"tokenizer": "smollm2"}, "train": FINETUNE_TRAIN_DEFAULTS}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run: [model] source, [data], [train] (fine-tuning defaults), [lora]."""

    model: SourceSettings = dataclasses.field(default_factory=SourceSettings)
    data: DataSettings = dataclasses.field(default_factory=lambda: DataSettings(tokenizer="smollm2"))
    train: TrainSettings = dataclasses.field(default_factory=lambda: TrainSettings(**FINETUNE_TRAIN_DEFAULTS))
    lora: LoRASettings = dataclasses.field(default_factory=LoRASettings)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        """From nested tables; unknown sections or keys raise ValueError naming them."""
        return cls(**sections_from_dict(d, FINETUNE_SECTIONS, "fine-tuning", SECTION_DEFAULTS))

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in FINETUNE_SECTIONS}

    def replace(self, **sections) -> "FinetuneConfig":
        """A copy with some fields of some sections changed: replace(train={"steps": 10})."""
        parts = {}
        for name, changes in sections.items():
            if name not in FINETUNE_SECTIONS:
                raise ValueError(f"unknown config section {name!r}; allowed: {sorted(FINETUNE_SECTIONS)}")
            parts[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **parts)


def load_finetune_config(path) -> FinetuneConfig:
    """Read a TOML fine-tuning config."""
    return FinetuneConfig.from_dict(read_toml(path, "config file"))


def load_source_model(name: str, *, on_blocks: bool = False) -> Llama:
    """The Llama of a registered model name or a GGUF path: in f32, or (on_blocks, for a base that
    QLoRA re-quantizes) on the file's own blocks, so that prepare_qlora dequantizes one linear at a
    time and the f32 model never exists in memory. Both compute the same weights (the f32 load
    dequantizes the same blocks)."""
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import resolve_model

    model, _ = load_gguf_model(resolve_model(name), runtime="packed" if on_blocks else "dequant")
    return model


def _float_embedding(embed) -> nnx.Embed:
    """The nnx.Embed (f32 table) of a GgufEmbed: its blocks dequantized once."""
    table = embed.dequantized_table()
    layer = nnx.eval_shape(lambda: nnx.Embed(embed.num_embeddings, embed.features, dtype=embed.dtype,
                                             rngs=nnx.Rngs(0)))
    layer.embedding.set_value(table)
    return layer


def _source_parameter_count(model: nnx.Module) -> int:
    """The float model's parameter count: float parameters plus each block-held linear's in x out."""
    held = sum(node.in_features * node.out_features for _, node in nnx.iter_graph(model)
               if holds_foreign_blocks(node))
    return _count(nnx.state(model, nnx.Param)) + held


def _mean_loss(model, batch):
    return next_token_nll(model(batch), batch).mean()


@partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4, 6))
def _finetune_step(graphdef, key: OptimizerKey, trained, params, counts, rest, opt_state, batch, lr):
    """One AdamW step over the trained parameters alone (`trained`: their nnx filter); the
    dropout streams' counters advance."""
    model = nnx.merge(graphdef, params, counts, rest)
    loss, grads = nnx.value_and_grad(_mean_loss, argnums=nnx.DiffState(0, trained))(model, batch)
    tx = make_optimizer(key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: u * lr, updates))
    return params, nnx.state(model, nnx.RngCount), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@partial(jax.jit, static_argnums=0)
def _finetune_eval_step(graphdef, params, counts, rest, batch):
    logits = nnx.merge(graphdef, params, counts, rest)(batch)
    return next_token_nll(logits, batch).sum(axis=-1)


def _nbytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


class FineTuner(Trainer):
    """One fine-tuning run of a FinetuneConfig (see Trainer for resume, evaluation and
    checkpoints). model: a float Llama to fine-tune instead of loading config.model.name (it is
    changed in place). Checkpoints hold the trained parameters, the dropout counters and the
    optimizer state; the frozen base is rebuilt (deterministically) from the source on resume.
    step_seconds / step_cpu_seconds: wall / process CPU time of every step run here (the first
    includes compilation);
    source_parameters: the float model's parameter count; trainable_parameters: what trains."""

    config_type = FinetuneConfig
    resume_never = RESUME_NEVER + ("lora.",)

    def __init__(self, config: FinetuneConfig, *, model: nnx.Module | None = None, **options):
        self._source = model
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        super().__init__(config, **options)

    def _build_model(self, vocab: int, restoring: bool) -> nnx.Module:
        settings = self.config.lora
        model = self._source if self._source is not None else \
            load_source_model(self.config.model.name, on_blocks=settings.base != FLOAT_BASE)
        self._source = None
        if isinstance(model.embed, GgufEmbed):  # the embedding (and tied head) is float while fine-tuning
            model.embed = _float_embedding(model.embed)
        embed_vocab = model.embed.embedding.get_value().shape[0]
        if embed_vocab != vocab:
            raise ValueError(f"the model has {embed_vocab} token ids but data.tokenizer "
                             f"{self.config.data.tokenizer!r} has {vocab}")
        self.source_parameters = _source_parameter_count(model)
        seed = self.config.train.seed
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        if settings.method == "full":
            self.adapted = []
        elif settings.base == FLOAT_BASE:
            self.adapted = add_lora(model, settings.lora_config(), rngs=rngs)
        else:
            self.adapted = prepare_qlora(model, settings.base, settings.lora_config(), rngs=rngs)
        self.quantize_report = None
        model.eval()
        self.eval_graphdef = nnx.split(model, self._trained, nnx.RngCount, ...)[0]
        model.train()
        return model

    @property
    def _trained(self):
        return nnx.Param if self.config.lora.method == "full" else LoRAParam

    def _split(self, model: nnx.Module):
        graphdef, params, counts, rest = nnx.split(model, self._trained, nnx.RngCount, ...)
        self.counts = jax.device_put(counts, self.replicated)  # placed as the step returns them (one compile)
        self.trainable_parameters = _count(params)
        return graphdef, params, rest

    def train_step(self) -> dict:
        start, cpu_start = time.perf_counter(), time.process_time()
        self.params, self.counts, self.opt_state, metrics = _finetune_step(
            self.graphdef, optimizer_key(self.config.train), self._trained, self.params, self.counts, self.rest,
            self.opt_state, self._put(self._batch(self.step)), jnp.float32(self.schedule(self.step)))
        metrics = {k: float(v) for k, v in metrics.items()}
        self.step_seconds.append(time.perf_counter() - start)
        self.step_cpu_seconds.append(time.process_time() - cpu_start)
        self.step += 1
        return metrics

    def evaluate(self) -> dict:
        total = 0.0
        for i, batch in enumerate(self._eval_batches):
            sums = np.asarray(_finetune_eval_step(self.eval_graphdef, self.params, self.counts, self.rest,
                                                  self._put(batch)), np.float64)
            real = min(batch.shape[0], self._eval_real - i * batch.shape[0])
            total += float(sums[:real].sum())
        loss = total / (self._eval_real * (self.config.train.seq_len - 1))
        return {"eval_loss": loss, "eval_ppl": math.exp(loss)}

    def state(self) -> dict:
        return {"params": self.params, "counts": self.counts, "opt_state": self.opt_state}

    def memory_bytes(self) -> dict:
        """Bytes held by the trained parameters, the frozen rest (the packed or float base) and the
        optimizer state."""
        return {"trained": _nbytes(self.params), "frozen": _nbytes(self.rest), "optimizer": _nbytes(self.opt_state)}

    def _set_state(self, state) -> None:
        self.params, self.counts, self.opt_state = state["params"], state["counts"], state["opt_state"]

    def model(self) -> nnx.Module:
        """The fine-tuned model with the current parameters (a fresh module, in eval mode)."""
        return nnx.merge(self.eval_graphdef, self.params, self.counts, self.rest)
