"""Quantized model checkpoints: `save(model, dir)` / `load(dir)` keep packed layers as their codes,
scales and specs (never a float copy), every other parameter as is, in one raw array file.

Layout of a checkpoint directory (written to a temporary sibling, renamed when complete):
  lowbit.json  format, the model (built-in kind and config, or the class of a foreign model),
               each packed layer's meta (class, contraction, spec, format), the array index
               (key -> dtype, shape, byte offset, byte count) and the caller's `info`
  arrays.bin   the arrays back to back, raw little-endian bytes, no padding: the bytes of a
               packed layer are exactly its codes, scales and offsets (and float bias)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.files import is_partial, partial_directory

FORMAT = "lowbit-model"
VERSION = 1
META_FILE = "lowbit.json"
ARRAYS_FILE = "arrays.bin"
LOAD_RUNTIMES = ("packed", "dequant")


def _dotted(path) -> str:
    return ".".join(str(part) for part in path)


def _layer_classes() -> dict[str, type]:
    import lowbit.nn.gguf_layers  # noqa: F401  (registers GgufEmbed, a block-quantized embedding)
    import lowbit.ptq.layers  # noqa: F401  (registers W8A8Linear and LLMInt8Linear)
    from lowbit.nn.packed_layer import LAYER_CLASSES

    return LAYER_CLASSES


def quantized_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """{dotted path: layer} of the quantized layers (registered classes) of a model."""
    classes = _layer_classes()
    found: dict[str, nnx.Module] = {}
    for path, node in nnx.iter_graph(model):
        name = _dotted(path)
        if type(node).__name__ in classes and isinstance(node, classes[type(node).__name__]):
            found[name] = node
    # A layer inside another (the packed layer of an ActQuantLayer) is saved by its holder.
    return dict(sorted((name, node) for name, node in found.items()
                       if not any(name.startswith(p + ".") for p in found)))


def _inside(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def float_variables(model: nnx.Module, skip=()) -> dict[str, nnx.Variable]:
    """{dotted path: Variable} of the model's variables outside the `skip` subtrees."""
    out: dict[str, nnx.Variable] = {}
    for path, node in nnx.iter_graph(model):
        name = _dotted(path)
        if isinstance(node, nnx.Variable) and not _inside(name, skip) and name not in out:
            value = node.get_value()
            if value is not None:
                out[name] = node
    return out


def _model_description(model: nnx.Module) -> dict[str, Any]:
    from lowbit.models.llama import Llama

    if isinstance(model, Llama):
        return {"kind": "llama", "config": model.config.to_dict(),
                "dtype": jnp.dtype(model.dtype).name}
    cls = type(model)
    return {"kind": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}


class _ArrayWriter:
    """Appends arrays to one raw file and keeps their index."""

    def __init__(self, handle):
        self.handle, self.offset, self.index = handle, 0, {}

    def add(self, key: str, value) -> None:
        if key in self.index:
            raise ValueError(f"array key {key!r} is written twice")
        is_key = jnp.issubdtype(jnp.asarray(value).dtype, jax.dtypes.prng_key) \
            if isinstance(value, jax.Array) else False
        array = np.asarray(jax.random.key_data(value) if is_key else value)
        array = np.array(array, order="C", copy=not array.flags.c_contiguous)
        data = array.tobytes()
        self.handle.write(data)
        self.index[key] = {"dtype": array.dtype.name, "shape": list(array.shape),
                           "offset": self.offset, "nbytes": len(data), "prng_key": is_key}
        self.offset += len(data)


def save(model: nnx.Module, directory: str | Path, *, info: dict[str, Any] | None = None) -> Path:
    """Writes a model, quantized or not, to a new directory.

    Packed layers (lowbit.nn.PackedLayer, and W8A8Linear / LLMInt8Linear of lowbit.ptq) are
    stored as their codes, scales, offsets and meta; every other variable as its array.
    info: JSON-able extras kept in the checkpoint (e.g. the PTQ method, its settings, the source
    model), returned by `read_info`. The directory is written under a temporary name and renamed
    when complete, so an interrupted save leaves nothing at `directory`; an existing
    `directory` is a ValueError.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a flax nnx.Module, got {type(model).__name__}")
    out = Path(directory).expanduser()
    if out.exists():
        raise ValueError(f"directory {out} already exists; choose a new path")
    try:
        info_json = json.loads(json.dumps(info if info is not None else {}))
    except TypeError as error:
        raise ValueError(f"info must be JSON-able: {error}") from None
    layers = quantized_layers(model)
    variables = float_variables(model, skip=layers)
    staging = partial_directory(out)
    try:
        layer_meta = {}
        with open(staging / ARRAYS_FILE, "wb") as handle:
            writer = _ArrayWriter(handle)
            for path, layer in layers.items():
                meta, arrays = layer.layer_state()
                layer_meta[path] = {"meta": meta, "arrays": sorted(arrays)}
                for name, value in sorted(arrays.items()):
                    writer.add(f"layers/{path}/{name}", value)
            for path, variable in variables.items():
                writer.add(f"params/{path}", variable.get_value())
            handle.flush()
            os.fsync(handle.fileno())
        meta = {"format": FORMAT, "version": VERSION, "model": _model_description(model),
                "layers": layer_meta, "params": list(variables), "arrays": writer.index,
                "info": info_json}
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))  # last: marks it complete
        if out.exists():
            raise ValueError(f"directory {out} appeared while writing; not replacing it")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's lowbit.json (format, model, layers, array index, info). Only a finished
    checkpoint is read: not a `.NAME.partial-*` directory (an interrupted save), and only one
    whose lowbit.json (written last) is valid and whose arrays.bin holds every indexed byte."""
    folder = Path(directory).expanduser()
    if is_partial(folder):
        raise ValueError(f"{directory} is an unfinished write (the partial directory of an "
                         "interrupted save), not a checkpoint; delete it and save again")
    path = folder / META_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a lowbit checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{directory}: {META_FILE} is not valid JSON ({error}); not a finished "
                         "checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT \
            or meta.get("version") != VERSION:
        meta = meta if isinstance(meta, dict) else {}
        raise ValueError(f"{directory}: unsupported checkpoint format {meta.get('format')!r} "
                         f"version {meta.get('version')!r} (expected {FORMAT!r} {VERSION})")
    arrays = folder / ARRAYS_FILE
    needed = max((entry["offset"] + entry["nbytes"] for entry in meta["arrays"].values()),
                 default=0)
    if not arrays.is_file() or arrays.stat().st_size < needed:
        size = arrays.stat().st_size if arrays.is_file() else 0
        raise ValueError(f"{directory} is not a finished checkpoint: {ARRAYS_FILE} holds {size} "
                         f"bytes, its index needs {needed}")
    return meta


def read_info(directory: str | Path) -> dict[str, Any]:
    """The `info` dict given to save (method, settings, source model...)."""
    return read_meta(directory)["info"]


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory).expanduser() / META_FILE).is_file()


def layer_bytes(directory: str | Path) -> dict[str, int]:
    """{layer path: bytes its arrays take in arrays.bin} for every packed layer."""
    meta = read_meta(directory)
    index = meta["arrays"]
    return {path: sum(index[f"layers/{path}/{name}"]["nbytes"] for name in entry["arrays"])
            for path, entry in meta["layers"].items()}


class _ArrayReader:
    def __init__(self, path: Path, index: dict[str, Any]):
        self.path, self.index = path, index

    def __call__(self, key: str):
        if key not in self.index:
            raise ValueError(f"checkpoint {self.path.parent} has no array {key!r}")
        entry = self.index[key]
        dtype = jnp.dtype(entry["dtype"])
        count = int(np.prod(entry["shape"], dtype=np.int64))
        array = np.fromfile(self.path, dtype=dtype, count=count, offset=entry["offset"])
        array = jnp.asarray(array.reshape(entry["shape"]))
        return jax.random.wrap_key_data(array) if entry.get("prng_key") else array


def _skeleton(meta: dict[str, Any], directory: Path, model):
    description = meta["model"]
    if model is not None:
        if not isinstance(model, nnx.Module):
            raise ValueError(f"model must be an nnx.Module built like the saved one, got "
                             f"{type(model).__name__}")
        return model
    if description["kind"] == "llama":
        from lowbit.models.llama import Llama, LlamaConfig

        config = LlamaConfig.from_dict(description["config"])
        return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0),
                                            dtype=jnp.dtype(description["dtype"])))
    raise ValueError(f"checkpoint {directory} holds a {description['class']} model, which is not "
                     "built into lowbit, so its structure must come from you: pass the float "
                     "model built as before quantization, lowbit.load(dir, model=MyModel(...)), "
                     "or without initializing it, model=nnx.eval_shape(lambda: MyModel(...)); "
                     "its quantized layers are replaced and every other parameter is overwritten")


def _dequantized_into(module, layer, path: str) -> None:
    """Writes a packed layer's dequantized weight (and bias) into the float module it came from."""
    from lowbit.nn.contraction import contraction_of

    contraction = contraction_of(module, path)
    if contraction.describe() != layer.contraction.describe():
        raise ValueError(f"{path}: the model's layer contracts as {contraction.describe()}, the "
                         f"checkpoint's as {layer.contraction.describe()}")
    kernel = module.kernel.get_value()
    module.kernel.set_value(layer.dequantized_kernel().astype(kernel.dtype))
    if getattr(module, "bias", None) is not None and getattr(layer, "bias", None) is not None:
        bias = module.bias.get_value()
        size = int(np.prod(bias.shape))
        order = np.asarray(contraction.bias_row(jnp.arange(size).reshape(bias.shape)))
        values = np.empty(size, np.float32)
        values[order] = np.asarray(layer.bias[...], np.float32)
        module.bias.set_value(jnp.asarray(values.reshape(bias.shape), bias.dtype))


def load(directory: str | Path, model: nnx.Module | None = None, *,
         runtime: str = "packed") -> nnx.Module:
    """The model saved in `directory`.

    model: None for built-in models (the Llama is rebuilt from its config without
      initializing weights); for any other model, the float model built as before
      quantization (or nnx.eval_shape(lambda: MyModel(...))): its quantized layers are
      replaced and all other parameters overwritten; a mismatch is a ValueError naming the path.
    runtime: "packed" (the packed layers as saved, running packed matmuls) or "dequant" (each
      packed weight dequantized once into a float layer of the model's original type: the
      fake-quant float execution of the same codes, for research and as a reference; needs
      the original layers, so W8A8 / LLM.int8() layers stay as they are; a GgufEmbed is
      dequantized into the model's nnx.Embed).
    """
    from lowbit.ptq.targets import module_at, replace_module

    if runtime not in LOAD_RUNTIMES:
        raise ValueError(f"runtime must be one of {LOAD_RUNTIMES}, got {runtime!r}")
    directory = Path(directory).expanduser()
    meta = read_meta(directory)
    read = _ArrayReader(directory / ARRAYS_FILE, meta["arrays"])
    skeleton = _skeleton(meta, directory, model)
    classes = _layer_classes()
    replaced, written = [], set()
    for path, entry in meta["layers"].items():
        layer_meta = dict(entry["meta"])
        cls = classes.get(layer_meta.get("class"))
        if cls is None:
            raise ValueError(f"{directory}: layer {path!r} has class {layer_meta.get('class')!r}; "
                             f"known: {sorted(classes)}")
        arrays = {name: read(f"layers/{path}/{name}") for name in entry["arrays"]}
        # A layer that transforms or scales its input rows keeps them (a float layer would not).
        own_input = layer_meta.get("input_transform") is not None or "input_scale" in arrays
        if "runtime" in layer_meta and (runtime == "packed" or own_input):
            layer_meta["runtime"] = runtime
        layer = cls.from_state(layer_meta, arrays)
        try:
            original = module_at(skeleton, path)
        except ValueError:
            raise ValueError(f"{directory}: the model has no layer at {path!r}; was it built "
                             "like the saved one?") from None
        if runtime == "dequant" and hasattr(layer, "dequantized_kernel") and not own_input \
                and isinstance(getattr(original, "kernel", None), nnx.Variable):
            _dequantized_into(original, layer, path)
            written |= {f"{path}.kernel", f"{path}.bias"}
        elif runtime == "dequant" and hasattr(layer, "dequantized_table") and isinstance(original, nnx.Embed):
            table = original.embedding.get_value()
            if tuple(table.shape) != (layer.num_embeddings, layer.features):
                raise ValueError(f"{path}: the model's embedding is {tuple(table.shape)}, the checkpoint's "
                                 f"{(layer.num_embeddings, layer.features)}")
            original.embedding.set_value(layer.dequantized_table().astype(table.dtype))
            written.add(f"{path}.embedding")
        else:
            replace_module(skeleton, path, layer)
            replaced.append(path)
        del arrays, layer
    variables = {k: v for k, v in float_variables(skeleton, skip=replaced).items()
                 if k not in written}
    missing = [p for p in variables if p not in set(meta["params"])]
    unused = [p for p in meta["params"] if p not in variables]
    if missing or unused:
        raise ValueError(f"{directory}: the model does not match the checkpoint: parameters not "
                         f"in the checkpoint {missing[:6]}, checkpoint parameters the model lacks "
                         f"{unused[:6]}")
    for path, variable in variables.items():
        array = read(f"params/{path}")
        expected = tuple(variable.get_value().shape)
        if tuple(array.shape) != expected:
            raise ValueError(f"{directory}: parameter {path!r} has shape {tuple(array.shape)} in "
                             f"the checkpoint, {expected} in the model")
        variable.set_value(array)
    return skeleton


def load_model_and_tokenizer(name_or_path: str | Path, runtime: str = "packed", activations: str = "f32"):
    """(model, tokenizer) for a registered model name, a GGUF path or a checkpoint directory,
    loaded with `runtime`: "packed" (a checkpoint's codes, or a GGUF on its own Q4_0/Q4_1/Q8_0
    blocks) or "dequant" (float weights); a checkpoint's tokenizer is its source model's.
    activations "int8" or "auto": the packed and GGUF layers round their inputs to int8 (always, or
    in the native decode GEMVs only; lowbit.nn.set_activations); a ValueError when no layer can."""
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import MODELS, resolve_model
    from lowbit.models.tokenizer import Tokenizer
    from lowbit.nn import set_activations

    if Path(name_or_path).expanduser().is_dir():
        model = load(name_or_path, runtime=runtime)
        source = read_info(name_or_path).get("source") or {}
        path = source.get("path")
        if path is None or not Path(path).is_file():
            if source.get("model") not in MODELS:
                raise ValueError(f"checkpoint {name_or_path} names no source model to take the tokenizer from")
            path = resolve_model(source["model"])
    else:
        path = resolve_model(str(name_or_path))
        model, _ = load_gguf_model(path, runtime=runtime)
    if set_activations(model, activations) == 0 and activations != "f32":
        raise ValueError(f"activations {activations!r}: {name_or_path} (runtime {runtime}) has no packed or GGUF "
                         "layer with integer codes to run them (use the packed runtime of a quantized model)")
    return model, Tokenizer.from_gguf(path)
