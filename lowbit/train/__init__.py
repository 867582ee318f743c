"""Quantization-aware training and fine-tuning (QLoRA, LoRA, full): TOML configs, the optax
training loop with evaluation, Orbax checkpoints with exact resume, data parallelism."""

from lowbit.train.checkpoint import CheckpointStore
from lowbit.train.config import (DataSettings, ModelSettings, QuantSettings, TrainConfig, TrainSettings,
                                 load_config)
from lowbit.train.data import batch_at, corpus_tokens, encode, eval_windows
from lowbit.train.finetune import FinetuneConfig, FineTuner, load_finetune_config
from lowbit.train.loop import Trainer, lr_schedule, make_mesh, make_optimizer, train

__all__ = [
    "CheckpointStore", "DataSettings", "FineTuner", "FinetuneConfig", "ModelSettings", "QuantSettings", "TrainConfig", "TrainSettings",
    "Trainer", "batch_at", "corpus_tokens", "encode", "eval_windows", "load_config", "load_finetune_config", "lr_schedule",
    "make_mesh", "make_optimizer", "train",
]
