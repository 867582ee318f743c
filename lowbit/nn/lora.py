"""LoRA adapters on any float or packed (QLoRA) Linear / LinearGeneral / Einsum / Conv: only the
adapters (LoRAParam) train, the base stays frozen; merge / unmerge, QLoRA preparation (NF4 base,
optional LoftQ initialization) and saving / restoring the adapters alone with Orbax.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec
from lowbit.kernels.dispatch import IMPLS
from lowbit.kernels.native import native_available
from lowbit.nn.contraction import Contraction, DotContraction, contraction_of, supported_base
from lowbit.nn.packed_layer import PackedLayer
from lowbit.nn.packed_linear import get_child, module_at, set_child

LoRAParam = nnx.LoRAParam  # the trainable adapter matrices (a Param subclass: nnx filters select it)

INITS = ("zero", "loftq")
BLOCK_LINEARS = r"layers\.\d+\..*"
QLORA_SPEC = "nf4:g64:dq"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Which layers get adapters and their shape.

    path: a regex that must match the whole dotted module path (re.fullmatch), as in QuantRule;
      the default takes every linear of the decoder blocks (QLoRA adapts all of them).
    rank: r of W + (alpha / r) A B with A: [K, r], B: [r, N]. alpha: the scale numerator.
    dropout: the rate of dropout on the adapter's input rows while training (0: none).
    init: "zero" (A random, B = 0: the adapted model starts equal to its base) or "loftq"
      (A B from the SVD of the quantization error W - dequant(Q(W)); needs the float weight,
      so only `prepare_qlora` can use it). loftq_iterations: LoftQ's alternating steps.
    """

    path: str = BLOCK_LINEARS
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "zero"
    loftq_iterations: int = 1

    def __post_init__(self):
        if not isinstance(self.path, str):
            raise ValueError(f"path must be a regex string, got {type(self.path).__name__}")
        try:
            object.__setattr__(self, "_pattern", re.compile(self.path))
        except re.error as error:
            raise ValueError(f"path {self.path!r} is not a valid regex: {error}") from None
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.loftq_iterations, bool) or not isinstance(self.loftq_iterations, int) \
                or self.loftq_iterations < 1:
            raise ValueError(f"loftq_iterations must be an integer >= 1, got {self.loftq_iterations!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        return self._pattern.fullmatch(path) is not None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown LoRA setting(s) {unknown}; allowed: {allowed}")
        return cls(**d)


def _contraction(base) -> Contraction:
    return base.contraction if isinstance(base, PackedLayer) else contraction_of(base)


class LoRA(nnx.Module):
    """y = base(x) + output(dropout(rows(x)) @ A @ B) * alpha / rank around a frozen `base`
    (nnx.Linear / LinearGeneral / Einsum / Conv, or a PackedLayer of one); rows / output are the
    base's [K, N] contraction (lowbit.nn.contraction), so A: [K, rank], B: [rank, N] (LoRAParam).

    A packed base multiplies from its packed codes (QLoRA; see `prepare_qlora` for the kernel that
    keeps the training step's memory with the packed base).
    `merge()` / `unmerge()` add / subtract the adapter product to a float base's kernel in place
    (the adapter is then skipped / used again); a packed base merges only by `merge_lora`.
    """

    def __init__(self, base, *, rank: int, alpha: float, dropout: float = 0.0, a=None, b=None,
                 rngs: nnx.Rngs):
        if supported_base(base) is None and not isinstance(base, PackedLayer):
            raise ValueError(f"base must be an nnx.Linear, LinearGeneral, Einsum, Conv or a PackedLayer, "
                             f"got {type(base).__name__}")
        config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout)  # validates the numbers
        self.contraction = _contraction(base)
        k, n = self.contraction.in_features, self.contraction.out_features
        self.base = base
        self.rank, self.alpha, self.scaling = config.rank, config.alpha, config.scaling
        if a is None:  # Kaiming-uniform rows as in the LoRA reference code; B = 0
            bound = 1.0 / math.sqrt(k)
            a = jax.random.uniform(rngs.params(), (k, rank), jnp.float32, -bound, bound)
        if b is None:
            b = jnp.zeros((rank, n), jnp.float32)
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        if a.shape != (k, rank) or b.shape != (rank, n):
            raise ValueError(f"a must be [K, rank] = {[k, rank]} and b [rank, N] = {[rank, n]}, "
                             f"got {list(a.shape)} and {list(b.shape)}")
        self.lora_a = LoRAParam(a)
        self.lora_b = LoRAParam(b)
        self.dropout = nnx.data(nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None)
        self.merged = False

    @property
    def is_packed(self) -> bool:
        return isinstance(self.base, PackedLayer)

    def delta_matrix(self) -> jax.Array:
        """(alpha / rank) A B: the [K, N] change the adapter makes to the base matrix (f32)."""
        return self.scaling * (self.lora_a[...] @ self.lora_b[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if self.merged:
            return y
        rows = self.contraction.rows(x).astype(jnp.float32)
        if self.dropout is not None:
            rows = self.dropout(rows)
        delta = (rows @ self.lora_a[...]) @ self.lora_b[...] * self.scaling
        return y + self.contraction.output(delta, x).astype(y.dtype)

    def _shift_kernel(self, sign: float) -> None:
        if self.is_packed:
            raise ValueError("a packed base cannot merge in place (its codes would have to be re-quantized, "
                             "which unmerge cannot undo); use merge_lora(model, spec) to export")
        kernel = self.base.kernel
        delta = self.contraction.kernel_from_matrix(self.delta_matrix())
        kernel.set_value((kernel.get_value() + sign * delta.astype(kernel.get_value().dtype)))

    def merge(self) -> None:
        """Fold the adapter into the float base kernel (W += (alpha/r) A B); the adapter is then skipped."""
        if self.merged:
            raise ValueError("this LoRA layer is already merged")
        self._shift_kernel(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge` (W -= (alpha/r) A B, equal up to float rounding); the adapter is used again."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged")
        self._shift_kernel(-1.0)
        self.merged = False


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRA]]:
    """(dotted path, LoRA) of every adapter in `model`, in graph order."""
    return [(".".join(str(k) for k in path), node) for path, node in nnx.iter_graph(model)
            if path and isinstance(node, LoRA)]


def _targets(model: nnx.Module, config: LoRAConfig) -> list[tuple[tuple, Any]]:
    found = []
    for path, node in nnx.iter_graph(model):
        if not path or not isinstance(node, nnx.Module):
            continue
        name = ".".join(str(k) for k in path)
        if isinstance(node, LoRA) and config.matches(name):
            raise ValueError(f"{name} already has a LoRA adapter")
        adaptable = supported_base(node) is not None or isinstance(node, PackedLayer) or holds_foreign_blocks(node)
        if adaptable and config.matches(name):
            found.append((path, node))
    if not found:
        raise ValueError(f"LoRA path {config.path!r} matches no linear-like layer of the model")
    return found


def add_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Wrap every layer whose path matches config.path (float or packed) in a LoRA adapter, in
    place; the base is kept as it is (no copy). Returns the adapted paths. init must be "zero"
    (LoftQ needs the float weights: use prepare_qlora)."""
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}")
    if config.init != "zero":
        raise ValueError(f"add_lora initializes with init='zero'; init {config.init!r} needs the float "
                         "weights before quantization: use prepare_qlora")
    targets = _targets(model, config)
    for path, node in targets:
        wrapped = LoRA(node, rank=config.rank, alpha=config.alpha, dropout=config.dropout, rngs=rngs)
        set_child(module_at(model, path[:-1]), path[-1], wrapped)
    return [".".join(str(k) for k in path) for path, _ in targets]


def loftq_factors(matrix: jax.Array, spec: QuantSpec, rank: int, scaling: float, iterations: int = 1):
    """(qarray, A, B) with dequant(Q) + scaling A B close to `matrix` [K, N] (LoftQ): alternately
    Q = quantize(W - scaling A B) and scaling A B = the rank-r SVD of W - dequant(Q)."""
    w = jnp.asarray(matrix, jnp.float32)
    correction = jnp.zeros_like(w)
    for _ in range(iterations):
        q = quantize(w - correction, spec, axis=0)
        u, s, vt = jnp.linalg.svd(w - q.dequantize(jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[:rank] / scaling)
        a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
        correction = scaling * (a @ b)
    return q, a, b


def holds_foreign_blocks(node) -> bool:
    """A Linear-shaped layer held in another quantized format that gives its float matrix on demand:
    `dequantized_matrix()` -> [in_features, out_features] f32, no bias (e.g. a GGUF model's
    GgufLinear on the file's blocks). prepare_qlora re-quantizes it without a float model in memory."""
    return callable(getattr(node, "dequantized_matrix", None)) and hasattr(node, "in_features") \
        and hasattr(node, "out_features")


def _source_matrix(node) -> tuple[Contraction, jax.Array]:
    """(contraction, f32 [K, N] matrix) of a float layer or of a layer holding foreign blocks."""
    if holds_foreign_blocks(node):
        contraction = DotContraction((node.in_features,), (node.out_features,), (-1,))
        return contraction, jnp.asarray(node.dequantized_matrix(), jnp.float32)
    contraction = contraction_of(node)
    return contraction, contraction.matrix(jnp.asarray(node.kernel.get_value(), jnp.float32))


def _float_target_paths(model: nnx.Module, config: LoRAConfig) -> list[tuple]:
    """Module paths of the float (or foreign-block) layers prepare_qlora quantizes (a packed one is
    a ValueError)."""
    paths = []
    for path, node in _targets(model, config):
        if isinstance(node, PackedLayer):
            raise ValueError(f"{'.'.join(map(str, path))} is already packed; prepare_qlora quantizes float layers "
                             "(use add_lora on a packed model)")
        paths.append(path)
    return paths


def training_impl() -> str:
    """The packed-matmul impl for a frozen base under training: "native" where the C++ kernels run
    (CPU backend, built), whose forward x W and input gradient dy W.T read the packed codes for any
    number of rows, so no float W exists in the step; else "auto"."""
    return "native" if jax.default_backend() == "cpu" and native_available() else "auto"


def prepare_qlora(model: nnx.Module, spec: QuantSpec | str = QLORA_SPEC, config: LoRAConfig | None = None, *,
                  rngs: nnx.Rngs, runtime: str = "packed", impl: str | None = None) -> list[str]:
    """QLoRA in place: each float layer matching config.path is quantized with `spec` (default
    NF4, blocks of 64, double-quantized scales) into a frozen PackedLayer, one layer at a time (its
    float kernel is dropped as it goes), and wrapped in a LoRA adapter (init "zero", or "loftq").
    A layer holding another quantized format (`dequantized_matrix()`, e.g. a GGUF model loaded on
    its blocks) is dequantized one layer at a time instead, so no float model is ever formed.
    runtime / impl: the PackedLayer's (impl None: `training_impl()`; runtime "dequant" forms each
    float W per call, as a float base would hold it). Returns the adapted paths."""
    impl = training_impl() if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be None or one of {IMPLS}, got {impl!r}")
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}")
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, QuantSpec) or spec.granularity == "token":
        raise ValueError(f"spec must be a weight QuantSpec or its string (e.g. {QLORA_SPEC!r}), got {spec!r}")
    paths = _float_target_paths(model, config)  # paths only: each float layer is freed once replaced
    for path in paths:
        parent = module_at(model, path[:-1])
        node = get_child(parent, path[-1])
        contraction, matrix = _source_matrix(node)
        if config.init == "loftq":
            q, a, b = loftq_factors(matrix, spec, config.rank, config.scaling, config.loftq_iterations)
        else:
            q, a, b = quantize(matrix, spec, axis=0), None, None
        bias = None if getattr(node, "bias", None) is None else node.bias.get_value()
        base = PackedLayer(contraction, pack(q), bias=bias, dtype=getattr(node, "dtype", jnp.float32),
                           runtime=runtime, impl=impl)
        wrapped = LoRA(base, rank=config.rank, alpha=config.alpha, dropout=config.dropout, a=a, b=b, rngs=rngs)
        set_child(parent, path[-1], wrapped)
    return [".".join(str(k) for k in path) for path in paths]


def merge_lora(model: nnx.Module, spec: QuantSpec | str | None = None, *, runtime: str = "packed") -> list[str]:
    """Replace every LoRA layer, in place, by one plain layer computing W + (alpha/r) A B: with
    spec None, a float layer (a float base's own module with the kernel updated; a packed base's
    dequantized matrix in an nnx.Linear, for Linear-shaped contractions); with a spec, a PackedLayer
    of the merged matrix re-quantized with it. Returns the merged paths."""
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    plans = []
    for name, layer in layers:
        if spec is None and layer.is_packed and not _linear_shaped(layer.contraction):
            raise ValueError(f"{name}: a packed {type(layer.contraction).__name__} merges into a re-quantized "
                             "base only (give spec)")
        plans.append((name, layer))
    for name, layer in plans:
        path = tuple(int(k) if k.isdigit() else k for k in name.split("."))
        set_child(module_at(model, path[:-1]), path[-1], _merged_layer(layer, spec, runtime))
    return [name for name, _ in plans]


def _linear_shaped(contraction: Contraction) -> bool:
    return getattr(contraction, "kind", None) == "dot" and len(contraction.in_shape) == 1 \
        and len(contraction.out_shape) == 1 and contraction.axis == (-1,)


def _merged_layer(layer: LoRA, spec: QuantSpec | None, runtime: str):
    base, contraction = layer.base, layer.contraction
    delta = 0.0 if layer.merged else layer.delta_matrix()
    if layer.is_packed:
        matrix = base.dequantized_matrix() + delta
        bias = None if base.bias is None else base.bias.get_value()
        dtype = base.dtype
    else:
        matrix = contraction.matrix(jnp.asarray(base.kernel.get_value(), jnp.float32)) + delta
        bias = None if base.bias is None else contraction.bias_row(base.bias.get_value())
        dtype = base.dtype
    if spec is not None:
        return PackedLayer(contraction, pack(quantize(matrix, spec, axis=0)), bias=bias, dtype=dtype,
                           runtime=runtime)
    if not layer.is_packed:
        base.kernel.set_value(contraction.kernel_from_matrix(matrix).astype(base.kernel.get_value().dtype))
        return base
    k, n = contraction.in_features, contraction.out_features
    linear = nnx.Linear(k, n, use_bias=bias is not None, dtype=dtype, rngs=nnx.Rngs(0))
    linear.kernel.set_value(matrix)
    if bias is not None:
        linear.bias.set_value(jnp.asarray(bias, jnp.float32))
    return linear


def lora_parameter_count(model: nnx.Module) -> int:
    """Number of trainable adapter values (A and B of every LoRA layer)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, LoRAParam)))


# ---- adapters alone on disk (Orbax) --------------------------------------------------------
ADAPTER_FORMAT = "lowbit-lora-adapters/1"


def adapter_record(model: nnx.Module) -> dict:
    """The JSON part of an adapter checkpoint: format, each adapted path with its rank and alpha."""
    return {"format": ADAPTER_FORMAT,
            "layers": {name: {"rank": layer.rank, "alpha": layer.alpha,
                              "shape": [layer.contraction.in_features, layer.contraction.out_features]}
                       for name, layer in lora_layers(model)}}


def save_adapters(model: nnx.Module, directory: str | Path) -> Path:
    """Write the adapter matrices alone (no base weights) to a new `directory` with Orbax (finalized
    by a rename: a killed save leaves no directory that restore_adapters would read)."""
    import orbax.checkpoint as ocp

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: nothing to save")
    if any(layer.merged for _, layer in layers):
        raise ValueError("unmerge the LoRA layers before saving the adapters (merged ones are in the base)")
    directory = Path(directory).expanduser().resolve()
    if directory.exists():
        raise ValueError(f"directory {directory} exists; adapters are written to a new directory")
    arrays = {name: {"a": layer.lora_a.get_value(), "b": layer.lora_b.get_value()} for name, layer in layers}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                        record=ocp.args.JsonSave(adapter_record(model))))
    return directory


def read_adapter_record(directory: str | Path) -> dict:
    import orbax.checkpoint as ocp

    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise ValueError(f"directory {directory} holds no saved adapters (not a directory)")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        record = checkpointer.restore(directory, ocp.args.Composite(record=ocp.args.JsonRestore())).record
    if not isinstance(record, dict) or record.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{directory} is not a lowbit adapter checkpoint (format {ADAPTER_FORMAT!r})")
    return record


def restore_adapters(model: nnx.Module, directory: str | Path) -> list[str]:
    """Load adapters saved by `save_adapters` into `model`, whose LoRA layers (same paths, ranks,
    shapes) must already be in place (e.g. from prepare_qlora / add_lora with the same config).
    Returns the restored paths."""
    import orbax.checkpoint as ocp

    record = read_adapter_record(directory)
    layers = dict(lora_layers(model))
    saved = record["layers"]
    current = adapter_record(model)["layers"]
    if saved != current:
        missing = sorted(set(saved) - set(current))
        extra = sorted(set(current) - set(saved))
        changed = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
        raise ValueError(f"the saved adapters do not fit this model: saved but not in the model {missing[:4]}, "
                         f"in the model but not saved {extra[:4]}, different rank/alpha/shape {changed[:4]}")
    target = {name: {"a": jax.ShapeDtypeStruct(layer.lora_a.get_value().shape, jnp.float32),
                     "b": jax.ShapeDtypeStruct(layer.lora_b.get_value().shape, jnp.float32)}
              for name, layer in layers.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        arrays = checkpointer.restore(Path(directory).expanduser().resolve(),
                                      ocp.args.Composite(arrays=ocp.args.StandardRestore(target))).arrays
    for name, layer in layers.items():
        layer.lora_a.set_value(jnp.asarray(arrays[name]["a"]))
        layer.lora_b.set_value(jnp.asarray(arrays[name]["b"]))
    return sorted(layers)
