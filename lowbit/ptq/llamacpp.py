"""llama.cpp's own quantizer as a reference point (needs the optional `ref` extra): re-quantize a
GGUF with `llama_model_quantize`, load the result into a lowbit model and account its linear
weights' storage exactly from the tensor types llama.cpp chose.
"""

from __future__ import annotations

import time
from pathlib import Path

import gguf
from flax import nnx

from lowbit.files import atomic_path
from lowbit.ptq.result import PTQResult

# Types whose every fallback (576-wide rows are not a multiple of 256, so K-quants fall back to
# Q4_0/Q5_0/Q5_1/Q8_0 for most tensors of SmolLM2) the lowbit GGUF reader can dequantize.
LLAMACPP_TYPES = ("Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q5_K_M", "Q5_K_S", "Q4_1", "Q4_0", "Q4_K_M",
                  "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
_LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise ValueError("llama.cpp quantization needs llama-cpp-python: pip install -e '.[ref]'"
                         ) from error
    return llama_cpp


def llamacpp_quantize(source: str | Path, destination: str | Path, gguf_type: str, *,
                      threads: int = 2) -> Path:
    """Writes `source` re-quantized by llama.cpp to `gguf_type` (one of LLAMACPP_TYPES, with
    llama.cpp's default per-tensor choices and fallbacks) to `destination`.

    The file is written next to the destination under a temporary name and renamed when
    complete, so a failed or interrupted run leaves nothing at `destination`.
    """
    if gguf_type not in LLAMACPP_TYPES:
        raise ValueError(f"gguf_type must be one of {LLAMACPP_TYPES}, got {gguf_type!r}")
    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise ValueError(f"source GGUF {str(source)!r} does not exist")
    if destination.exists():
        raise ValueError(f"destination {str(destination)!r} already exists")
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params.allow_requantize = True  # the source is usually already quantized (SmolLM2: Q4_1)
    params.nthread = threads
    with atomic_path(destination) as temporary:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(temporary).encode(),
                                                params)
        if status != 0:
            raise ValueError(f"llama_model_quantize failed with status {status} for "
                             f"{gguf_type} on {str(source)!r}")
    return destination


def linear_storage(path: str | Path) -> tuple[int, int, dict[str, int]]:
    """(bits, weights, {type name: tensor count}) of the block linears of a llama GGUF."""
    bits = weights = 0
    types: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name.startswith("blk.") and tensor.name.endswith(_LINEAR_SUFFIXES):
            bits += 8 * int(tensor.n_bytes)
            weights += int(tensor.n_elements)
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return bits, weights, types


def llamacpp_quantize_model(model, source: str | Path, gguf_type: str,
                            workdir: str | Path) -> PTQResult:
    """Replaces the weights of `model` (loaded from `source`) in place with those of the
    llama.cpp `gguf_type` re-quantization of `source`, written under `workdir`.

    The result has no QArrays (the K-quant layouts are llama.cpp's); its storage comes from the
    GGUF tensor types.
    """
    from lowbit.models.loader import load_gguf_model

    start = time.perf_counter()
    destination = llamacpp_quantize(source, Path(workdir) / f"{Path(source).stem}.{gguf_type}.gguf",
                                    gguf_type)
    seconds = time.perf_counter() - start
    requantized, config = load_gguf_model(destination)
    if config != model.config:
        raise ValueError(f"{str(destination)!r} does not hold the same architecture as the model")
    nnx.update(model, nnx.state(requantized))
    bits, weights, types = linear_storage(destination)
    return PTQResult(method="llamacpp", linears={}, seconds=seconds,
                     settings={"gguf_type": gguf_type, "tensor_types": types,
                               "file": str(destination)},
                     storage=(bits, weights))
