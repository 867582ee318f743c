"""Training configuration: four TOML sections ([model], [data], [train], [quant]) parsed into
frozen dataclasses; an unknown key raises ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from lowbit.files import read_toml
from lowbit.models.llama import LlamaConfig
from lowbit.nn.rules import LAYER_NAMES, PRESETS, QuantRule, preset_rules

TOKENIZERS = {"byte": 256, "smollm2": 49152}


def _check(name: str, value, kind, minimum=None, allow_none: bool = False):
    if value is None and allow_none:
        return value
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be {kind.__name__}{bound}, got {value!r}")
    return value


def _check_range(name: str, value: float, low: float, high: float, high_open: bool) -> None:
    """A float already checked finite must lie in [low, high) or [low, high]."""
    if value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}{bracket}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Decoder shape. n_kv_heads defaults to n_heads, head_dim to d_model / n_heads, ffn_dim to
    8/3 d_model rounded up to a multiple of 32 (Llama's SwiGLU width)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads"):
            _check(f"model.{name}", getattr(self, name), int, 1)
        for name in ("n_kv_heads", "head_dim", "ffn_dim"):
            _check(f"model.{name}", getattr(self, name), int, 1, allow_none=True)
        object.__setattr__(self, "rope_base", _check("model.rope_base", self.rope_base, float, 1.0))
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_heads "
                             f"({self.n_heads}) unless model.head_dim is given")

    def llama_config(self, vocab_size: int, max_seq_len: int) -> LlamaConfig:
        ffn = self.ffn_dim or -(-(8 * self.d_model // 3) // 32) * 32
        return LlamaConfig(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads or self.n_heads,
                           head_dim=self.head_dim or self.d_model // self.n_heads, ffn_dim=ffn,
                           max_seq_len=max_seq_len, rope_base=self.rope_base)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """tokenizer: 'byte' (256 ids) or 'smollm2' (the SmolLM2 BPE, 49152 ids); corpus: 'pydoc'
    or a text file; the last eval_fraction of the token stream is held out for evaluation."""

    tokenizer: str = "byte"
    corpus: str = "pydoc"
    eval_fraction: float = 0.1

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"data.tokenizer must be one of {sorted(TOKENIZERS)}, got {self.tokenizer!r}")
        _check("data.corpus", self.corpus, str)
        frac = _check("data.eval_fraction", self.eval_fraction, float)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {frac!r}")
        object.__setattr__(self, "eval_fraction", frac)

    @property
    def vocab_size(self) -> int:
        return TOKENIZERS[self.tokenizer]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Optimization: AdamW with linear warmup (default steps / 10 steps) then cosine decay to
    min_lr_ratio * lr, global-norm
    gradient clipping; weight decay on kernels and embeddings only. eval_interval: steps between
    evaluations (0: only at the end); eval_windows: held-out windows per evaluation (None: all).
    checkpoint_dir: Orbax checkpoints every checkpoint_interval steps and at the end ("" = none).
    data_parallel: devices on the 'data' mesh axis (the batch is split over them; 0 = all)."""

    steps: int = 500
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    eval_interval: int = 100
    eval_windows: int | None = None
    checkpoint_dir: str = ""
    checkpoint_interval: int = 0
    data_parallel: int = 1

    def __post_init__(self):
        if self.warmup_steps is None:
            _check("train.steps", self.steps, int, 1)
            object.__setattr__(self, "warmup_steps", self.steps // 10)
        for name, minimum in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("warmup_steps", 0),
                              ("seed", 0), ("eval_interval", 0), ("checkpoint_interval", 0),
                              ("data_parallel", 0)):
            _check(f"train.{name}", getattr(self, name), int, minimum)
        _check("train.eval_windows", self.eval_windows, int, 1, allow_none=True)
        for name, minimum in (("lr", 0.0), ("min_lr_ratio", 0.0), ("weight_decay", 0.0),
                              ("grad_clip", 0.0), ("b1", 0.0), ("b2", 0.0)):
            object.__setattr__(self, name, _check(f"train.{name}", getattr(self, name), float, minimum))
        if not self.lr > 0:
            raise ValueError(f"train.lr must be a finite number > 0, got {self.lr!r}")
        for name in ("b1", "b2"):  # Adam's moment decays: 1 would never forget, above 1 diverges
            _check_range(f"train.{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        _check_range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, high_open=False)
        _check("train.checkpoint_dir", self.checkpoint_dir, str)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be below train.steps ({self.steps})")


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """preset: one of lowbit.nn.rules.PRESETS (fp32, ternary, binary, int4-lsq, ...); or rules:
    a list of QuantRule tables ([[quant.rules]] in TOML), first match wins; not both."""

    preset: str = "fp32"
    rules: tuple = ()

    def __post_init__(self):
        rules = tuple(r if isinstance(r, QuantRule) else _rule(r, i) for i, r in enumerate(self.rules))
        object.__setattr__(self, "rules", rules)
        if self.preset not in PRESETS:
            raise ValueError(f"quant.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if rules and self.preset != "fp32":
            raise ValueError("give quant.preset or quant.rules, not both")

    def quant_rules(self) -> tuple:
        return self.rules or preset_rules(self.preset)


def _rule(table, index: int) -> QuantRule:
    if not isinstance(table, dict):
        raise ValueError(f"quant.rules[{index}] must be a table, got {table!r}")
    try:
        return QuantRule.from_dict(table)
    except (ValueError, TypeError) as error:
        raise ValueError(f"quant.rules[{index}]: {error}") from None


def sections_from_dict(d: Any, sections: dict[str, type], kind: str,
                       defaults: dict[str, dict] | None = None) -> dict[str, Any]:
    """{section name: settings dataclass} from a config's nested tables (absent keys take
    `defaults`, then the dataclass's own); unknown sections or keys raise ValueError naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"a {kind} config must be a table, got {type(d).__name__}")
    unknown = sorted(set(d) - set(sections))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; allowed: {sorted(sections)}")
    parts = {}
    for name, section in sections.items():
        table = d.get(name, {})
        if not isinstance(table, dict):
            raise ValueError(f"config section [{name}] must be a table, got {table!r}")
        allowed = [f.name for f in dataclasses.fields(section)]
        bad = sorted(set(table) - set(allowed))
        if bad:
            raise ValueError(f"unknown config key(s) {[f'{name}.{k}' for k in bad]}; "
                             f"allowed keys in [{name}]: {allowed}")
        parts[name] = section(**{**(defaults or {}).get(name, {}), **table})
    return parts


SECTIONS = {"model": ModelSettings, "data": DataSettings, "train": TrainSettings, "quant": QuantSettings}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run: model shape, data, optimization and quantization."""

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    quant: QuantSettings = dataclasses.field(default_factory=QuantSettings)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """From nested tables; unknown sections or keys raise ValueError naming them."""
        return cls(**sections_from_dict(d, SECTIONS, "training"))

    def to_dict(self) -> dict:
        """A JSON-able dict that from_dict reads back (rules as tables of strings)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in ("model", "data", "train")}
        out["quant"] = {"preset": self.quant.preset, "rules": [_rule_table(r) for r in self.quant.rules]}
        return out

    def replace(self, **sections) -> "TrainConfig":
        """A copy with some fields of some sections changed: replace(train={"steps": 10})."""
        parts = {}
        for name, changes in sections.items():
            if name not in SECTIONS:
                raise ValueError(f"unknown config section {name!r}; allowed: {sorted(SECTIONS)}")
            parts[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **parts)


def _rule_table(rule: QuantRule) -> dict:
    table = {}
    for field in dataclasses.fields(rule):
        value = getattr(rule, field.name)
        if value is None or value == field.default:
            continue
        if isinstance(value, type):
            value = {cls: name for name, cls in LAYER_NAMES.items()}[value]
        table[field.name] = str(value) if not isinstance(value, (bool, int, float)) else value
    return table


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML training config."""
    return TrainConfig.from_dict(read_toml(path, "config file"))
