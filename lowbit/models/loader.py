"""Load a llama GGUF checkpoint into a lowbit Llama, streaming one tensor at a time: either on the
file's own Q4_0 / Q4_1 / Q8_0 blocks (runtime "packed") or dequantized to float (runtime "dequant").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from gguf import GGMLQuantizationType

from lowbit.kernels.dispatch import check_activations
from lowbit.models.gguf.blocks import dequantize_ggml
from lowbit.models.gguf.llama_names import checked_llama_tensors, iter_llama_weights, llama_config, unpermute_rope_rows
from lowbit.models.gguf.reader import open_gguf, require_finite
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.nn.gguf_layers import GgufEmbed, GgufLinear

RUNTIMES = ("packed", "dequant")
# ggml types whose blocks gguf_matmul computes from as stored, and the byte offsets of their f16 fields.
BLOCK_TYPES = {GGMLQuantizationType.Q4_0: (18, (0,)), GGMLQuantizationType.Q4_1: (20, (0, 2)),
               GGMLQuantizationType.Q8_0: (34, (0,))}
# lowbit weight name (after "layers.{i}.") -> (sub-module, attribute) of a Block.
_BLOCK_LINEARS = {"wq": ("attn", "wq"), "wk": ("attn", "wk"), "wv": ("attn", "wv"), "wo": ("attn", "wo"),
                  "w_gate": ("mlp", "w_gate"), "w_up": ("mlp", "w_up"), "w_down": ("mlp", "w_down")}


def load_gguf_model(path: str | Path, *, runtime: str = "dequant", dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32, impl: str = "auto",
                    activations: str = "f32") -> tuple[Llama, LlamaConfig]:
    """(model, config) from a llama GGUF file.

    runtime "dequant" (the default, what PTQ, training and export start from): every weight is
    dequantized to param_dtype in an nnx.Llama. runtime "packed": every Q4_0 / Q4_1 / Q8_0 matrix
    stays as the file's blocks (no re-quantization, no float copy) in a GgufLinear, the embedding
    in a GgufEmbed that is also the tied head (lowbit.nn.gguf_layers), computed through gguf_matmul (impl:
    its "auto", "native" or "xla"; activations: "f32", the default, which equals the "dequant" model
    within float rounding, or "int8", rounded per 32-block as ggml does); other tensor types are
    dequantized to param_dtype as before.
    The Q/K rows come back in Hugging Face order, so the model uses rope_layout="half".
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    reader = open_gguf(path)
    config = LlamaConfig.from_dict({**llama_config(reader), "rope_layout": "half"})
    if runtime == "dequant":
        model = Llama.from_weights(config, iter_llama_weights(reader), dtype=dtype,
                                   param_dtype=param_dtype)
        return model, config
    check_activations(activations)
    return _load_on_blocks(reader, config, dtype, param_dtype, dict(impl=impl, activations=activations)), config


def _load_on_blocks(reader, config: LlamaConfig, dtype, param_dtype, options: dict) -> Llama:
    """The Llama on blocks of a checked reader: built abstractly, then each tensor placed as it is read."""
    where = reader.data.filename
    file_config = llama_config(reader)
    plan, tensors = checked_llama_tensors(reader, file_config)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    for name, gguf_name, conversion, _ in plan:
        tensor = tensors[gguf_name]
        stored = tuple(int(d) for d in reversed(tensor.shape))
        if tensor.tensor_type in BLOCK_TYPES and len(stored) == 2:
            blocks = _file_blocks(tensor, stored, conversion, file_config, where)
            _place_blocks(model, name, blocks, tensor.tensor_type.name, dtype, options)
        else:
            values = dequantize_ggml(tensor.data, tensor.tensor_type, stored)
            require_finite(where, gguf_name, values)
            _place_float(model, name, values, conversion, file_config, param_dtype)
    leftover = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))
                if isinstance(leaf, jax.ShapeDtypeStruct)]
    if leftover:
        raise ValueError(f"{where}: no tensor filled {', '.join(leftover[:8])}")
    return model


def _file_blocks(tensor, stored: tuple[int, int], conversion: str, config: dict, where) -> np.ndarray:
    """A quantized matrix's blocks [rows, K/32 * block bytes] in lowbit's row order (Q/K rows in HF
    order), after checking that every f16 scale and offset is finite."""
    block_bytes, f16_fields = BLOCK_TYPES[tensor.tensor_type]
    rows, k = stored
    blocks = np.asarray(tensor.data, np.uint8).reshape(rows, k // 32 * block_bytes)
    per_block = blocks.reshape(rows, k // 32, block_bytes)
    halves = [per_block[..., offset:offset + 2].copy().view("<f2") for offset in f16_fields]
    require_finite(where, tensor.name, *halves)
    if conversion == "query":
        return unpermute_rope_rows(blocks, config["n_heads"])
    if conversion == "key":
        return unpermute_rope_rows(blocks, config["n_kv_heads"])
    return blocks


def _place_blocks(model: Llama, name: str, blocks: np.ndarray, ggml_type: str, dtype, options: dict) -> None:
    data = jnp.asarray(blocks)
    if name == "embed":
        model.embed = GgufEmbed(data, ggml_type, dtype=dtype, **options)
    elif name == "lm_head":
        model.lm_head = GgufLinear(data, ggml_type, **options)
    else:
        _, layer, weight = name.split(".")
        module, attribute = _BLOCK_LINEARS[weight]
        setattr(getattr(model.layers[int(layer)], module), attribute, GgufLinear(data, ggml_type, **options))


def _place_float(model: Llama, name: str, values: np.ndarray, conversion: str, config: dict,
                 param_dtype) -> None:
    """A dequantized tensor into its float parameter (a linear weight to nnx.Linear's [in, out])."""
    if conversion == "query":
        values = unpermute_rope_rows(values, config["n_heads"])
    elif conversion == "key":
        values = unpermute_rope_rows(values, config["n_kv_heads"])
    if conversion != "copy":
        values = np.ascontiguousarray(values.T)
    if name == "embed":
        variable = model.embed.embedding
    elif name == "final_norm":
        variable = model.final_norm.weight
    elif name == "lm_head":
        variable = model.lm_head.kernel
    else:
        _, layer, weight = name.split(".")
        block = model.layers[int(layer)]
        if weight in _BLOCK_LINEARS:
            module, attribute = _BLOCK_LINEARS[weight]
            variable = getattr(getattr(block, module), attribute).kernel
        else:
            variable = getattr(block, weight).weight
    variable.set_value(jnp.asarray(values, dtype=param_dtype))
