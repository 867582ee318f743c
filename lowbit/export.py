"""Export a lowbit Llama (float, PTQ-packed or weight-only fake-quant) to a GGUF file llama.cpp loads:
packed grids that map onto the type are written as their codes, the rest re-encoded (error reported);
layers are weight-only, or round their inputs as llama.cpp does for the type (TQ: int8 per 256).
"""

from __future__ import annotations

import builtins
import math
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from lowbit.core.quantize import expand_groups
from lowbit.models.gguf.blocks import dequantize_ggml
from lowbit.models.gguf.encode import CODE_RANGES, block_size, encode_codes, encode_values
from lowbit.models.gguf.llama_names import llama_tensor_plan, to_gguf_layout
from lowbit.models.gguf.reader import metadata_value, open_gguf
from lowbit.models.gguf.writer import MetadataValue, PlannedTensor, copied_metadata, write_gguf
from lowbit.models.llama import Llama

T = GGMLQuantizationType
EXPORT_TYPES = ("Q4_0", "Q4_1", "Q8_0", "TQ1_0", "TQ2_0", "F16", "F32")
_FILE_TYPES = {"Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1,
               "Q8_0": LlamaFileType.MOSTLY_Q8_0, "TQ1_0": LlamaFileType.MOSTLY_TQ1_0,
               "TQ2_0": LlamaFileType.MOSTLY_TQ2_0, "F16": LlamaFileType.MOSTLY_F16,
               "F32": LlamaFileType.ALL_F32}
# A float token embedding (also the output head when tied) of a quantized export is written as
# Q8_0, as llama.cpp keeps its output tensor at 6-8 bits (Q6_K falls back to Q8_0 on rows
# that are not a multiple of 256).
EMBEDDING_TYPE = "Q8_0"
# The ternary types need rows that are a multiple of 256; other rows fall back to Q4_0 (as
# llama.cpp's quantizer does), which holds ternary codes exactly: levels -1, 0, 1 times d.
TERNARY_FALLBACK = "Q4_0"
# The input rounding ggml applies to a matmul with weights of a type (its vec_dot type), as a
# lowbit act_spec: TQ1_0 / TQ2_0 multiply Q8_K inputs (int8, one float32 scale absmax / 127 per
# 256 inputs). A layer that quantizes its inputs exactly this way exports to that type and runs
# the same function in llama.cpp; any other input quantization cannot be written to GGUF.
ACTIVATION_SPECS = {"TQ1_0": "int8:g256:f32", "TQ2_0": "int8:g256:f32"}
_DYNAMIC_ESTIMATORS = ("identity", "clipped")
_LINEAR_PARENTS = {"wq": "attn", "wk": "attn", "wv": "attn", "wo": "attn", "w_gate": "mlp",
                   "w_up": "mlp", "w_down": "mlp"}


def _check_type(gguf_type: str) -> str:
    if not isinstance(gguf_type, str) or gguf_type.upper() not in EXPORT_TYPES:
        raise ValueError(f"type must be one of {', '.join(EXPORT_TYPES)}, got {gguf_type!r}")
    return gguf_type.upper()


def _architecture_metadata(config: dict[str, Any], gguf_type: str) -> dict[str, MetadataValue]:
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    entries = {
        "general.file_type": MetadataValue(int(_FILE_TYPES[gguf_type]), u32),
        "llama.vocab_size": MetadataValue(config["vocab_size"], u32),
        "llama.context_length": MetadataValue(config["max_seq_len"], u32),
        "llama.embedding_length": MetadataValue(config["d_model"], u32),
        "llama.block_count": MetadataValue(config["n_layers"], u32),
        "llama.feed_forward_length": MetadataValue(config["ffn_dim"], u32),
        "llama.attention.head_count": MetadataValue(config["n_heads"], u32),
        "llama.attention.head_count_kv": MetadataValue(config["n_kv_heads"], u32),
        "llama.attention.key_length": MetadataValue(config["head_dim"], u32),
        "llama.attention.value_length": MetadataValue(config["head_dim"], u32),
        "llama.rope.dimension_count": MetadataValue(config["head_dim"], u32),
        "llama.rope.freq_base": MetadataValue(config["rope_base"], f32),
        "llama.attention.layer_norm_rms_epsilon": MetadataValue(config["norm_eps"], f32),
    }
    if gguf_type not in ("F16", "F32"):
        entries["general.quantization_version"] = MetadataValue(2, u32)
    return entries


def _source_metadata(source: str | Path, config: dict[str, Any]) -> dict[str, MetadataValue]:
    """The tokenizer.* and descriptive general.* entries of the source GGUF."""
    reader = open_gguf(source)
    if metadata_value(reader, "general.architecture", None) != "llama":
        raise ValueError(f"source {source} is not a llama GGUF file; only llama sources are "
                         "supported")
    tokens = metadata_value(reader, "tokenizer.ggml.tokens", None)
    if tokens is not None and len(tokens) != config["vocab_size"]:
        raise ValueError(f"source {source} has a vocabulary of {len(tokens)} tokens, the model "
                         f"{config['vocab_size']}; give the GGUF the model came from")
    skipped = ("general.architecture", "general.file_type", "general.quantization_version",
               "general.alignment")
    return copied_metadata(reader, lambda key: key.startswith("tokenizer.")
                           or (key.startswith("general.") and key not in skipped))


# ---- the weights of each tensor -----------------------------------------------------------
def _floats(value) -> np.ndarray:
    return np.asarray(jnp.asarray(value).astype(jnp.float32))


def _linear(model: Llama, name: str):
    if name == "lm_head":
        return model.lm_head
    _, index, leaf = name.split(".")
    return getattr(getattr(model.layers[int(index)], _LINEAR_PARENTS[leaf]), leaf)


def _check_llama_blocks(model: Llama) -> None:
    """Every block computes the llama GGUF graph: the Llama's own Attention and MLP modules (a
    rotated model's HadamardMLP adds an online transform that llama.cpp does not run)."""
    from lowbit.models.llama import MLP, Attention

    for i, block in enumerate(model.layers):
        for name, cls in (("attn", Attention), ("mlp", MLP)):
            module = getattr(block, name)
            if type(module) is not cls:
                online = " (an online Hadamard transform before w_down, lowbit.ptq.rotation)" \
                    if type(module).__name__ == "HadamardMLP" else ""
                raise ValueError(
                    f"layers.{i}.{name} is a {type(module).__name__}{online}, not the Llama's own "
                    f"{cls.__name__}; a llama GGUF file holds only the Llama's graph. A rotated "
                    "model exports when its rotations are all folded: rotate with a plan without "
                    "online entries (rotate_model(model, plan=dataclasses.replace("
                    "rotation_plan(model), online=()))) before quantizing")


def _check_input_quantization(layer, where: str, gguf_type: str) -> None:
    """A layer may quantize its inputs only as llama.cpp does for `gguf_type` (ACTIVATION_SPECS)."""
    if layer.input_norm:
        raise ValueError(f"{where} RMS-normalizes its input at run time (BitNet's input_norm), "
                         "which a llama GGUF file cannot express")
    if getattr(layer, "input_transform", None) is not None:
        raise ValueError(f"{where} applies an online {layer.input_transform} transform to its input "
                         "(a rotated model's MLP, lowbit.ptq.rotation), which llama.cpp's llama graph "
                         "does not have; the folded rotations export, the online one cannot: rotate "
                         "with a plan without online entries (rotate_model(model, plan=dataclasses."
                         "replace(rotation_plan(model), online=()))) before quantizing to export")
    if getattr(layer, "input_scale", None) is not None:
        raise ValueError(f"{where} multiplies its input by a per-feature scale (an AWQ/SmoothQuant "
                         "scale with no norm or layer to fold into), which a llama GGUF file cannot "
                         "express")
    if layer.act_spec is None:
        return
    wanted = ACTIVATION_SPECS.get(gguf_type)
    if str(layer.act_spec) != wanted or layer.act_estimator not in _DYNAMIC_ESTIMATORS:
        allowed = "; ".join(f"{spec} for {t}" for t, spec in ACTIVATION_SPECS.items())
        raise ValueError(f"{where} quantizes its input as {layer.act_spec} ({layer.act_estimator}), "
                         f"which llama.cpp does not do for {gguf_type} weights; a GGUF file can "
                         f"only hold weight-only layers, or layers whose input quantization is "
                         f"the type's own ({allowed}, dynamic scales)")


def _layer_weight(layer, name: str, shape: tuple[int, int], gguf_type: str,
                  compute: bool = True):
    """(QArray or None, [K, N] float32 weight the layer multiplies by, description); with
    compute=False only the checks run (a layer that cannot be exported to `gguf_type` is a
    ValueError)."""
    from lowbit.nn.packed_layer import PackedLayer
    from lowbit.nn.quant_linear import QuantLayer

    where = f"layer {name!r} ({type(layer).__name__})"
    if isinstance(layer, (PackedLayer, QuantLayer)):
        _check_input_quantization(layer, where, gguf_type)
        if getattr(layer, "bias", None) is not None:
            raise ValueError(f"{where} has a bias; llama GGUF linears have none")
        if (layer.in_features, layer.out_features) != shape:
            raise ValueError(f"{where} is [{layer.in_features}, {layer.out_features}], expected "
                             f"{list(shape)}")
        if not compute:
            return None
        if isinstance(layer, PackedLayer):
            return layer.weight_qarray(), _floats(layer.dequantized_matrix()), f"packed {layer.spec}"
        return None, _floats(layer.quantized_matrix()), f"fake-quant {layer.weight_spec}"
    if isinstance(layer, nnx.Linear):
        if layer.bias is not None:
            raise ValueError(f"{where} has a bias; llama GGUF linears have none")
        return None if not compute else (None, _floats(layer.kernel.get_value()), "float")
    raise ValueError(f"{where} cannot be exported to GGUF: supported layers are nnx.Linear, "
                     "lowbit.nn.PackedLayer and weight-only QuantLinear (W8A8 / LLM.int8() "
                     "layers quantize activations at run time)")


def _block_constant(values: np.ndarray, block: int) -> np.ndarray | None:
    """[N, K] per-element values -> [N, K / block] when constant within every block, else None."""
    blocks = values.reshape(values.shape[0], -1, block)
    return blocks[:, :, 0] if np.array_equal(blocks, np.broadcast_to(blocks[:, :, :1],
                                                                    blocks.shape)) else None


def _exact_blocks(qarray, conversion: str, config: dict, permute: bool,
                  qtype: GGMLQuantizationType) -> tuple[np.ndarray | None, str]:
    """The blocks of `qtype` holding the QArray's codes and scales as they are, or (None,
    reason) when its grid does not map onto the type."""
    spec = qarray.spec
    if spec.kind not in ("int", "ternary") or spec.double_quant:
        return None, f"{spec} codes are not integer levels"
    n = qarray.shape[0]

    def to_gguf(per_group):  # a per-group statistic -> [N, K] per element in GGUF row order
        full = np.broadcast_to(np.asarray(expand_groups(per_group, spec, 0, n)), qarray.shape)
        return to_gguf_layout(full, conversion, config, permute)

    codes = to_gguf_layout(np.asarray(qarray.codes), conversion, config, permute)
    codes = codes.astype(np.int16)
    scale = to_gguf(qarray.scale_values())
    zero = None if qarray.zero is None else to_gguf(qarray.zero_values())
    block = block_size(qtype)
    scale = _block_constant(scale, block)
    zero = None if zero is None else _block_constant(zero, block)
    if scale is None or (qarray.zero is not None and zero is None):
        return None, f"{spec} scales are not constant within {qtype.name}'s blocks of {block}"
    if qtype == T.Q4_1 and zero is None:
        codes, zero = codes + 8, scale * -8  # symmetric codes as Q4_1: q + 8, m = -8 d
    elif zero is not None and qtype != T.Q4_1:
        return None, f"{spec} is asymmetric; {qtype.name} is symmetric"
    low, high = CODE_RANGES[qtype]
    if codes.min() < low or codes.max() > high:
        return None, f"{spec} codes leave {qtype.name}'s range {low}..{high}"
    f16_exact = lambda a: np.array_equal(a.astype(np.float16).astype(np.float32), a)  # noqa: E731
    if not f16_exact(scale) or (zero is not None and not f16_exact(zero)):
        return None, f"{spec} scales are not float16 values"
    return encode_codes(codes, scale, zero, qtype), ""


def _tensor_type(role: str, gguf_type: str, row: int, name: str) -> tuple[str, str]:
    """(ggml type name, note) of a tensor: norms F32, a float embedding or untied float output
    head Q8_0 in quantized exports, ternary types falling back to Q4_0 on rows that are not a
    multiple of 256."""
    if role == "norm":
        return "F32", ""
    wanted = gguf_type
    if role in ("embedding", "float head") and gguf_type not in ("F16", "F32"):
        wanted = EMBEDDING_TYPE
    note = ""
    if row % block_size(wanted) and wanted in ("TQ1_0", "TQ2_0"):
        note = f"rows of {row} not a multiple of 256: {TERNARY_FALLBACK}"
        wanted, requested = TERNARY_FALLBACK, wanted
    if row % block_size(wanted):
        raise ValueError(f"tensor {name!r} has rows of {row}, not a multiple of {wanted}'s block "
                         f"size {block_size(wanted)}; export it as F16 or F32")
    if note:
        warnings.warn(f"{name}: rows of {row} are not a multiple of 256, written as "
                      f"{TERNARY_FALLBACK} instead of {requested}", stacklevel=3)
    return wanted, note


class _Tensor:
    """One tensor of the export: how to produce its bytes, and its report entry once written."""

    def __init__(self, model: Llama, lowbit_name: str, gguf_name: str, conversion: str,
                 shape: tuple[int, ...], gguf_type: str, config: dict, permute: bool):
        self.model, self.lowbit_name, self.conversion = model, lowbit_name, conversion
        self.config, self.permute = config, permute
        self.stored_shape = tuple(shape) if conversion == "copy" else tuple(shape[::-1])
        role = ("embedding" if lowbit_name == "embed" else "norm" if len(shape) == 1
                else "linear")
        self.role = role
        if role == "linear" and lowbit_name == "lm_head" and type(model.lm_head) is nnx.Linear:
            role = "float head"
        type_name, note = _tensor_type(role, gguf_type, self.stored_shape[-1], gguf_name)
        if role != "norm" and role != "embedding":  # validate the layer before anything is written
            _layer_weight(_linear(model, lowbit_name), lowbit_name, tuple(shape), type_name,
                          compute=False)
        self.qtype = T[type_name]
        self.report = {"name": gguf_name, "lowbit_name": lowbit_name, "type": type_name,
                       "shape": list(self.stored_shape)}
        if note:
            self.report["note"] = note
        self.planned = PlannedTensor(gguf_name, self.stored_shape, self.qtype, self.produce)

    def _source(self):
        if self.role == "norm":
            layer_norm = {"final_norm": self.model.final_norm}
            if self.lowbit_name != "final_norm":
                _, index, leaf = self.lowbit_name.split(".")
                layer_norm[self.lowbit_name] = getattr(self.model.layers[int(index)], leaf)
            return None, _floats(layer_norm[self.lowbit_name].weight.get_value()), "float"
        if self.role == "embedding":  # a block table (e.g. --embed q8_0) is written from its values
            embed = self.model.embed
            table = embed.embedding.get_value() if isinstance(embed, nnx.Embed) else embed.dequantized_table()
            return None, _floats(table), "float"
        shape = self.stored_shape[::-1]
        return _layer_weight(_linear(self.model, self.lowbit_name), self.lowbit_name, shape,
                             self.qtype.name)

    def produce(self) -> np.ndarray:
        qarray, weight, description = self._source()
        target = to_gguf_layout(weight, self.conversion, self.config, self.permute)
        del weight
        data, reason = None, "float weights"
        if qarray is not None and self.qtype in CODE_RANGES:
            data, reason = _exact_blocks(qarray, self.conversion, self.config, self.permute,
                                         self.qtype)
        from_codes = data is not None
        if data is None:
            data = encode_values(target, self.qtype)
        decoded = dequantize_ggml(data, self.qtype, self.stored_shape)
        squared = float(np.sum((decoded.astype(np.float64) - target) ** 2))
        self.report.update(weights=description, from_codes=from_codes,
                           exact=bool(np.array_equal(decoded, target)), squared_error=squared,
                           mse=squared / target.size)
        if qarray is not None and not from_codes and self.qtype in CODE_RANGES:
            self.report["reencoded_because"] = reason
        return data


def model_and_source(model: str | Path) -> tuple[Llama, str | None]:
    """(model, source GGUF) of a checkpoint directory, a registered name or a GGUF path."""
    from lowbit.checkpoint import is_checkpoint, load, read_info
    from lowbit.models.loader import load_gguf_model
    from lowbit.models.registry import MODELS, resolve_model

    path = Path(model).expanduser()
    if path.is_dir():
        if not is_checkpoint(path):
            raise ValueError(f"{path} is not a lowbit checkpoint (no lowbit.json)")
        loaded = load(path)
        source = read_info(path).get("source") or {}
        gguf_path = source.get("path")
        if gguf_path is None or not Path(gguf_path).is_file():
            gguf_path = (str(resolve_model(source["model"])) if source.get("model") in MODELS
                         else None)
        return loaded, gguf_path
    gguf_path = resolve_model(model)
    loaded, _ = load_gguf_model(gguf_path)
    return loaded, str(gguf_path)


def export_gguf(model: nnx.Module | str | Path, path: str | Path, type: str = "Q4_0", *,
                source: str | Path | None = None, force: bool = False) -> dict[str, Any]:
    """Write a lowbit Llama to a GGUF file llama.cpp runs; returns the report.

    model: a lowbit Llama (float, with PackedLayers from PTQ / lowbit.load, or with weight-only
      QuantLinears), or a checkpoint directory, a registered model name or a GGUF path.
    type: one of EXPORT_TYPES, the type of the linear weights. A packed weight whose grid maps
      onto it (symmetric int4 g32 -> Q4_0, asymmetric int4 g32 -> Q4_1, int8 g32 -> Q8_0,
      ternary with one scale per 256 -> TQ1_0 / TQ2_0; any codes that fit, with float16 scales
      constant within each block) is written as its codes, without a second rounding; every other
      weight is re-encoded from the weight the model multiplies by, and the report gives the
      added error. Norms are F32; a float token embedding is Q8_0 in quantized exports; ternary
      types fall back to Q4_0 (with a warning) on rows that are not a multiple of 256.
      Layers must be weight-only, except that TQ1_0 / TQ2_0 take layers whose inputs are
      quantized as llama.cpp quantizes them for those types (act_spec int8:g256:f32, Q8_K;
      ACTIVATION_SPECS), e.g. a ternary model trained with 8-bit activations.
    source: the GGUF whose tokenizer and general.* metadata are copied (default: the model's
      own source for a checkpoint / name / path; none for a module: the file then has no
      tokenizer, which llama.cpp needs).
    force: replace an existing file (otherwise a ValueError).
    Returns {"path", "type", "bytes", "source", "tensors": [per tensor: name, lowbit_name, type,
    shape, weights (what the model held), from_codes (written from the codes), exact (decodes
    bit-exactly to the model's weight), squared_error, mse, and reencoded_because / note where
    they apply], "exact_tensors", "from_codes_tensors", "weight_mse"}: weight_mse is the added
    squared error per element over the linears and the embedding.
    """
    gguf_type = _check_type(type)
    out = Path(path).expanduser()
    if out.exists() and not force:
        raise ValueError(f"output {out} already exists; pass force=True (--force) to replace it")
    if isinstance(model, (str, Path)):
        model, own_source = model_and_source(model)
        source = own_source if source is None else source
    if not isinstance(model, Llama):
        raise ValueError(f"model must be a lowbit Llama (lowbit.models.llama.Llama: llama "
                         f"architecture, the only one GGUF export supports), a checkpoint "
                         f"directory, a registered name or a GGUF path; got "
                         f"{builtins.type(model).__name__}")
    _check_llama_blocks(model)
    config = model.config.to_dict()
    permute = config["rope_layout"] == "half"
    metadata = {} if source is None else _source_metadata(source, config)
    metadata.update(_architecture_metadata(config, gguf_type))
    tensors = [_Tensor(model, name, gguf_name, conversion, shape, gguf_type, config, permute)
               for name, gguf_name, conversion, shape in llama_tensor_plan(config)]
    write_gguf(out, "llama", metadata, [t.planned for t in tensors], force=force)
    reports = [t.report for t in tensors]
    weighted = [r for r in reports if not r["lowbit_name"].endswith("norm")]
    elements = sum(math.prod(r["shape"]) for r in weighted)
    return {"path": str(out), "type": gguf_type, "bytes": out.stat().st_size,
            "source": None if source is None else str(source), "tensors": reports,
            "exact_tensors": sum(r["exact"] for r in reports),
            "from_codes_tensors": sum(r["from_codes"] for r in reports),
            "weight_mse": sum(r["squared_error"] for r in weighted) / elements}


