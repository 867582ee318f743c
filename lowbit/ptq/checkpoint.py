"""Quantized checkpoints: an orbax directory with the QArrays of the block linears, the norms (AWQ
and SmoothQuant fold scales into them), the config, the specs, a report, and the source model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lowbit.core.quantize import FP8_DTYPES, QArray
from lowbit.core.spec import QuantSpec
from lowbit.files import is_partial, partial_directory
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.ptq.driver import module_at, replace_module
from lowbit.ptq.layers import LLMInt8Linear, W8A8Linear
from lowbit.ptq.result import PTQResult

FORMAT = "lowbit-ptq"
VERSION = 1
META_FILE = "meta.json"
REPORT_FILE = "report.json"
ARRAYS_DIR = "arrays"
_SOURCE_WEIGHTS = ("embed", "lm_head")  # taken from the source model when there is one


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}} (orbax keys stay free of dots)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def _get(tree: dict[str, Any], key: str) -> Any:
    node = tree
    for part in key.split("."):
        node = node[part]
    return node


def _qarray_arrays(q: QArray) -> dict[str, Any]:
    codes = np.asarray(q.codes)
    if q.spec.kind in FP8_DTYPES:
        codes = codes.view(np.uint8)
    out = {"codes": codes,
           "scale": _qarray_arrays(q.scale) if isinstance(q.scale, QArray) else np.asarray(q.scale)}
    if q.zero is not None:
        out["zero"] = np.asarray(q.zero)
    return out


def _qarray_meta(q: QArray) -> dict[str, Any]:
    return {"spec": str(q.spec), "axis": int(q.axis), "shape": list(q.shape),
            "scale": _qarray_meta(q.scale) if isinstance(q.scale, QArray) else None,
            "has_zero": q.zero is not None}


def _qarray_from(arrays: dict[str, Any], meta: dict[str, Any]) -> QArray:
    spec = QuantSpec.parse(meta["spec"])
    codes = np.asarray(arrays["codes"])
    if spec.kind in FP8_DTYPES:
        codes = codes.view(jnp.dtype(FP8_DTYPES[spec.kind]))
    if meta["scale"] is not None:
        scale = _qarray_from(arrays["scale"], meta["scale"])
    else:
        scale = jnp.asarray(arrays["scale"])
    zero = jnp.asarray(arrays["zero"]) if meta["has_zero"] else None
    q = QArray(jnp.asarray(codes), scale, zero, spec, int(meta["axis"]))
    if list(q.shape) != list(meta["shape"]):
        raise ValueError(f"checkpoint QArray has shape {q.shape}, its metadata says "
                         f"{meta['shape']}")
    return q


def _non_linear_names(config: LlamaConfig, with_source: bool) -> list[str]:
    names = [f"layers.{i}.{n}" for i in range(config.n_layers) for n in ("attn_norm", "ffn_norm")]
    names.append("final_norm")
    if not with_source:
        names.append("embed")
        if not config.tied_embeddings:
            names.append("lm_head")
    return names


def _non_linear_variable(model: Llama, name: str):
    if name == "embed":
        return model.embed.embedding
    if name == "lm_head":
        return model.lm_head.kernel
    return module_at(model, name).weight


def save_quantized(out_dir: str | Path, model: Llama, result: PTQResult, *,
                   source: dict[str, Any] | None = None) -> Path:
    """Writes the checkpoint of a model quantized by `result` into a new directory out_dir.

    source: {"model": what the user named, "path": the GGUF file, "sha256": its hash} when the
    model came from a GGUF file: the embedding (and an untied head) are then read from it on
    load; None stores them too. The norms are always stored. Everything is written to a
    temporary sibling directory that is renamed at the end, so an interrupted run leaves no
    half-written checkpoint. An existing out_dir is a ValueError.
    """
    out = Path(out_dir).expanduser()
    if out.exists():
        raise ValueError(f"output directory {out} already exists; choose a new path")
    if not isinstance(result, PTQResult):
        raise ValueError(f"result must be a PTQResult, got {type(result).__name__}")
    if source is not None and not {"model", "path"} <= set(source):
        raise ValueError("source must hold at least 'model' and 'path'")
    config = model.config
    non_linear = {name: np.asarray(_non_linear_variable(model, name)[...]) for name in
                  _non_linear_names(config, source is not None)}
    linears = {path: _qarray_arrays(entry.weight) for path, entry in result.linears.items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "method": result.method,
        "config": config.to_dict(),
        "dtype": str(jnp.dtype(model.dtype)),
        "settings": result.report()["settings"],
        "source": source,
        "non_linear": sorted(non_linear),
        "linears": {path: {"weight": _qarray_meta(entry.weight), "runtime": entry.runtime,
                           "options": entry.options}
                    for path, entry in result.linears.items()},
    }
    staging = partial_directory(out)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save((staging / ARRAYS_DIR).absolute(),
                          {"linears": _nest(linears), "non_linear": _nest(non_linear)})
        checkpointer.wait_until_finished()
        (staging / REPORT_FILE).write_text(json.dumps(result.report(), indent=1))
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))  # last: marks it complete
        if out.exists():
            raise ValueError(f"output directory {out} appeared while writing; not replacing it")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata (method, config, specs, runtimes, source). Only a finished
    checkpoint is read: not a `.NAME.partial-*` directory (an interrupted save), and only one
    holding its arrays, its report and its metadata (written last)."""
    folder = Path(directory).expanduser()
    if is_partial(folder):
        raise ValueError(f"{directory} is an unfinished write (the partial directory of an "
                         "interrupted save), not a checkpoint; delete it and quantize again")
    path = folder / META_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a lowbit quantized checkpoint (no {META_FILE})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{directory}: {META_FILE} is not valid JSON ({error}); not a finished "
                         "checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT \
            or meta.get("version") != VERSION:
        meta = meta if isinstance(meta, dict) else {}
        raise ValueError(f"{directory}: unsupported checkpoint format "
                         f"{meta.get('format')!r} version {meta.get('version')!r}")
    for part in (REPORT_FILE, ARRAYS_DIR):
        if not (folder / part).exists():
            raise ValueError(f"{directory} is not a finished checkpoint (no {part})")
    return meta


def read_report(directory: str | Path) -> dict[str, Any]:
    """The report written with the checkpoint (per-layer errors, bits per weight, time)."""
    read_meta(directory)
    return json.loads((Path(directory).expanduser() / REPORT_FILE).read_text())


def _source_path(source: dict[str, Any]) -> Path:
    from lowbit.models.registry import MODELS, resolve_model, sha256_of

    path = Path(source["path"])
    if not path.is_file():
        if str(source.get("model")) in MODELS:
            path = resolve_model(source["model"])
        else:
            raise ValueError(f"the checkpoint's source model {source['path']} is missing")
    digest = source.get("sha256")
    if digest and sha256_of(path) != digest:
        raise ValueError(f"source model {path} does not match the checkpoint (sha256 differs)")
    return path


def _source_weights(path: Path, names: set[str]) -> Iterator[tuple[str, np.ndarray]]:
    from lowbit.models.gguf import iter_llama_weights

    for name, weight in iter_llama_weights(path, keep_quantized=True):
        if name in names:
            yield name, np.asarray(weight.dequantize() if isinstance(weight, QArray) else weight,
                                   np.float32)


def load_quantized(directory: str | Path) -> tuple[Llama, LlamaConfig, str | None]:
    """(model, config, tokenizer_source) from a checkpoint written by save_quantized.

    Dequantized linears get float kernels equal to QArray.dequantize(); W8A8 and LLM.int8
    linears become W8A8Linear / LLMInt8Linear. tokenizer_source is the source GGUF path
    (for Tokenizer.from_gguf) or None when the checkpoint has no source model.
    """
    directory = Path(directory).expanduser()
    meta = read_meta(directory)
    config = LlamaConfig.from_dict(meta["config"])
    restored = ocp.StandardCheckpointer().restore((directory / ARRAYS_DIR).absolute())
    linears = {path: _qarray_from(_get(restored["linears"], path), info["weight"])
               for path, info in meta["linears"].items()}

    def weights() -> Iterator[tuple[str, np.ndarray]]:
        for name in meta["non_linear"]:
            yield name, np.asarray(_get(restored["non_linear"], name), np.float32)
        for path, q in linears.items():
            yield path.replace(".attn.", ".").replace(".mlp.", "."), np.asarray(q.dequantize())
        if meta["source"] is not None:
            needed = {n for n in _SOURCE_WEIGHTS if n not in meta["non_linear"]}
            if config.tied_embeddings:
                needed.discard("lm_head")
            yield from _source_weights(source_path, needed)

    source_path = _source_path(meta["source"]) if meta["source"] is not None else None
    model = Llama.from_weights(config, weights(), dtype=jnp.dtype(meta["dtype"]))
    for path, info in meta["linears"].items():
        q = linears[path]
        if info["runtime"] == "w8a8":
            options = info["options"]
            replace_module(model, path, W8A8Linear.from_qarray(q, options["act"],
                                                               options.get("act_scale")))
        elif info["runtime"] == "llm_int8":
            replace_module(model, path, LLMInt8Linear.from_qarray(q, info["options"]["threshold"]))
        else:
            module_at(model, path)  # the path must exist
    return model, config, None if source_path is None else str(source_path)
