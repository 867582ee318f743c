"""The llama tensor names of GGUF and lowbit's names and layout: the config from llama.* metadata,
the converter's Q/K row permutation for llama.cpp's RoPE (and its inverse), and streaming a llama
file's weights in lowbit's [in, out] layout (optionally as exact QArrays).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGUFReader

from lowbit.models.gguf.blocks import QARRAY_SPECS, check_decodable, dequantize_ggml, qarray_parts
from lowbit.models.gguf.reader import MISSING, as_reader, find_tensor, metadata_value, require_finite

def _number(value) -> float:
    """A float32 metadata value as the shortest float that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def llama_config(source: str | Path | GGUFReader) -> dict:
    """The model configuration of a llama GGUF file, read from its llama.* metadata.

    Keys: vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, rope_base,
    norm_eps, max_seq_len, tied_embeddings.
    """
    reader = as_reader(source)
    where = reader.data.filename
    arch = metadata_value(reader, "general.architecture", None)
    if arch != "llama":
        raise ValueError(f"{where}: architecture {arch!r} is not supported (only 'llama')")
    scaling = metadata_value(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ValueError(f"{where}: rope scaling {scaling!r} is not supported (only 'none')")

    def key(name, default=MISSING):
        return metadata_value(reader, f"llama.{name}", default)

    d_model = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv_heads = int(key("attention.head_count_kv", n_heads))
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"{where}: head_count {n_heads} must be a positive multiple of "
                         f"head_count_kv {n_kv_heads}")
    head_dim = int(key("attention.key_length", d_model // n_heads))
    value_dim = int(key("attention.value_length", head_dim))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim or head_dim % 2:
        raise ValueError(f"{where}: key length {head_dim}, value length {value_dim} and rope "
                         f"dimension {rope_dim} must be equal and even")
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ValueError(f"{where}: tensor 'token_embd.weight' is missing")
    embed_rows = int(find_tensor(reader, "token_embd.weight").shape[-1])
    return {
        "vocab_size": int(key("vocab_size", embed_rows)),
        "d_model": d_model,
        "n_layers": int(key("block_count")),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "ffn_dim": int(key("feed_forward_length")),
        "rope_base": _number(key("rope.freq_base", 10000.0)),
        "norm_eps": _number(key("attention.layer_norm_rms_epsilon")),
        "max_seq_len": int(key("context_length")),
        "tied_embeddings": "output.weight" not in names,
    }


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the GGUF converter's Q/K row permutation on an [out, ...] array.

    The converter maps HF rows with w.reshape(n_heads, 2, head_dim/2, ...).swapaxes(1, 2);
    this inverts it, so RoPE applies in HF's rotate_half layout (pairs j, j + head_dim/2).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    grouped = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
    return grouped.swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The GGUF converter's Q/K row permutation on an [out, ...] array in HF order (rotate_half
    pairs j, j + head_dim/2), giving llama.cpp's order (adjacent pairs): w.reshape(n_heads, 2,
    head_dim/2, ...).swapaxes(1, 2). `unpermute_rope_rows` is its inverse."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    grouped = w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
    return grouped.swapaxes(1, 2).reshape(w.shape)


def llama_tensor_plan(config: dict) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(lowbit name, GGUF name, conversion, lowbit shape) for every tensor of a llama file."""
    d, ffn, vocab = config["d_model"], config["ffn_dim"], config["vocab_size"]
    q_dim = config["n_heads"] * config["head_dim"]
    kv_dim = config["n_kv_heads"] * config["head_dim"]
    plan = [("embed", "token_embd.weight", "copy", (vocab, d))]
    for i in range(config["n_layers"]):
        block = f"blk.{i}."
        layer = f"layers.{i}."
        plan += [
            (layer + "attn_norm", block + "attn_norm.weight", "copy", (d,)),
            (layer + "wq", block + "attn_q.weight", "query", (d, q_dim)),
            (layer + "wk", block + "attn_k.weight", "key", (d, kv_dim)),
            (layer + "wv", block + "attn_v.weight", "linear", (d, kv_dim)),
            (layer + "wo", block + "attn_output.weight", "linear", (q_dim, d)),
            (layer + "ffn_norm", block + "ffn_norm.weight", "copy", (d,)),
            (layer + "w_gate", block + "ffn_gate.weight", "linear", (d, ffn)),
            (layer + "w_up", block + "ffn_up.weight", "linear", (d, ffn)),
            (layer + "w_down", block + "ffn_down.weight", "linear", (ffn, d)),
        ]
    plan.append(("final_norm", "output_norm.weight", "copy", (d,)))
    if not config["tied_embeddings"]:
        plan.append(("lm_head", "output.weight", "linear", (d, vocab)))
    return plan


def _to_lowbit_layout(array: np.ndarray, conversion: str, config: dict) -> np.ndarray:
    """GGUF numpy order ([out, in] for matrices) -> lowbit layout ([in, out])."""
    if conversion == "copy":
        return array
    if conversion == "query":
        array = unpermute_rope_rows(array, config["n_heads"])
    elif conversion == "key":
        array = unpermute_rope_rows(array, config["n_kv_heads"])
    return np.ascontiguousarray(array.T)


def to_gguf_layout(array: np.ndarray, conversion: str, config: dict,
                   permute_rope: bool = True) -> np.ndarray:
    """lowbit layout ([in, out] for matrices) -> GGUF numpy order ([out, in]), the inverse of
    the reading direction; Q/K rows are permuted into llama.cpp's RoPE order when `permute_rope`
    (a model in HF rotate_half order), kept as they are otherwise (already interleaved)."""
    if conversion == "copy":
        return array
    array = np.ascontiguousarray(np.asarray(array).T)
    if permute_rope and conversion == "query":
        array = permute_rope_rows(array, config["n_heads"])
    elif permute_rope and conversion == "key":
        array = permute_rope_rows(array, config["n_kv_heads"])
    return array


def checked_llama_tensors(reader: GGUFReader, config: dict) -> tuple[list, dict]:
    """(llama_tensor_plan(config), {GGUF name: tensor}) after checking, before any tensor is read,
    that the file holds exactly the plan's tensors, each of a decodable type and its plan's shape."""
    where = reader.data.filename
    plan = llama_tensor_plan(config)
    tensors = {t.name: t for t in reader.tensors}
    missing = [gguf_name for _, gguf_name, _, _ in plan if gguf_name not in tensors]
    if missing:
        raise ValueError(f"{where}: llama tensors missing: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    expected = {gguf_name for _, gguf_name, _, _ in plan}
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise ValueError(f"{where}: tensors lowbit's llama does not use: "
                         f"{', '.join(unexpected[:8])}")
    for name, gguf_name, conversion, shape in plan:
        tensor = tensors[gguf_name]
        check_decodable(tensor.tensor_type, f"{where}: tensor {gguf_name!r}")
        stored = tuple(int(d) for d in reversed(tensor.shape))
        wanted = shape if conversion == "copy" else shape[::-1]
        if stored != wanted:
            raise ValueError(f"{where}: tensor {gguf_name!r} has shape {stored}, expected {wanted}")
    return plan, tensors


def iter_llama_weights(source: str | Path | GGUFReader,
                       keep_quantized: bool = False) -> Iterator[tuple[str, object]]:
    """Yield (lowbit name, weight) for a llama GGUF file, one tensor at a time.

    Weights are float32 numpy arrays: "embed" [vocab, d]; "layers.{i}.attn_norm" /
    "ffn_norm" [d]; "wq" [d, n_heads*head_dim]; "wk", "wv" [d, n_kv_heads*head_dim];
    "wo" [n_heads*head_dim, d]; "w_gate", "w_up" [d, ffn]; "w_down" [ffn, d]; "final_norm"
    [d]; "lm_head" [d, vocab] only for untied files. Q/K rows are in HF order (rotate_half
    RoPE). With keep_quantized=True, Q4_0/Q4_1/Q8_0 tensors come as exact QArrays instead
    (groups of 32 along the input axis: axis 0 of a linear weight, axis 1 of "embed").
    A tensor whose values (or QArray scales and offsets) are NaN or inf is a ValueError naming it.
    """
    reader = as_reader(source)
    where = reader.data.filename
    config = llama_config(reader)
    plan, tensors = checked_llama_tensors(reader, config)
    for name, gguf_name, conversion, _ in plan:
        tensor = tensors[gguf_name]
        stored = tuple(int(d) for d in reversed(tensor.shape))
        if keep_quantized and tensor.tensor_type in QARRAY_SPECS:
            yield name, _llama_qarray(tensor.data, tensor.tensor_type, stored, conversion, config,
                                      where, gguf_name)
        else:
            values = dequantize_ggml(tensor.data, tensor.tensor_type, stored)
            require_finite(where, gguf_name, values)
            yield name, _to_lowbit_layout(values, conversion, config)


def _make_qarray(codes, scale, zero, spec: str, axis: int):
    import jax.numpy as jnp

    from lowbit.core.quantize import QArray
    from lowbit.core.spec import QuantSpec

    zero = None if zero is None else jnp.asarray(zero)
    return QArray(jnp.asarray(codes), jnp.asarray(scale), zero, QuantSpec.parse(spec), axis)


def _llama_qarray(data, qtype, stored_shape, conversion: str, config: dict, where, gguf_name):
    """A Q4_0/Q4_1/Q8_0 tensor as a QArray in lowbit's layout (see iter_llama_weights)."""
    codes, scale, zero, spec = qarray_parts(data, qtype, stored_shape)
    require_finite(where, gguf_name, scale, zero)
    if conversion == "copy":
        return _make_qarray(codes, scale, zero, spec, len(stored_shape) - 1)
    codes, scale = (_to_lowbit_layout(a, conversion, config) for a in (codes, scale))
    zero = None if zero is None else _to_lowbit_layout(zero, conversion, config)
    return _make_qarray(codes, scale, zero, spec, 0)


def tensor_qarray(source: str | Path | GGUFReader, name: str, transpose: bool = True):
    """One Q4_0/Q4_1/Q8_0 tensor as an exact QArray.

    For a matrix stored [out, in] (numpy order) and transpose=True, the result is [in, out]
    with groups along axis 0, lowbit's layout for linear weights; otherwise groups run along
    the last axis of the numpy-order shape. No Q/K row reordering is applied here.
    """
    reader = as_reader(source)
    tensor = find_tensor(reader, name)
    stored = tuple(int(d) for d in reversed(tensor.shape))
    codes, scale, zero, spec = qarray_parts(tensor.data, tensor.tensor_type, stored)
    require_finite(reader.data.filename, name, scale, zero)
    if transpose and len(stored) == 2:
        return _make_qarray(codes.T, scale.T, None if zero is None else zero.T, spec, 0)
    return _make_qarray(codes, scale, zero, spec, len(stored) - 1)
