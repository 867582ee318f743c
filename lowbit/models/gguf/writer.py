"""Write a GGUF file with the gguf package's GGUFWriter, one tensor at a time: the tensor table is
declared first, each tensor's bytes are produced only when it is written; the file appears at its
path only when complete (temporary file, then rename).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from lowbit.files import atomic_path
from lowbit.models.gguf.blocks import BLOCK_LAYOUTS


class PlannedTensor(NamedTuple):
    """A tensor to write: its GGUF name, numpy-order shape (the reverse of ggml's ne), ggml type,
    and a function returning its encoded bytes (uint8, exactly `tensor_nbytes(shape, qtype)`)."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    produce: Callable[[], np.ndarray]


class MetadataValue(NamedTuple):
    """One metadata entry: the value and its GGUF value type (and item type for arrays)."""

    value: Any
    kind: GGUFValueType
    item_kind: GGUFValueType | None = None


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, type_size = BLOCK_LAYOUTS[qtype]
    if not shape or shape[-1] % block:
        raise ValueError(f"{qtype.name} needs rows whose length is a multiple of {block}; got "
                         f"shape {shape}")
    return math.prod(shape) // block * type_size


def copied_metadata(reader: GGUFReader, keep: Callable[[str], bool]) -> dict[str, MetadataValue]:
    """The metadata entries of a GGUF file whose key passes `keep`, with their value types."""
    out = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or not keep(field.name):
            continue
        kind = field.types[0]
        item_kind = field.types[-1] if kind == GGUFValueType.ARRAY else None
        out[field.name] = MetadataValue(field.contents(), kind, item_kind)
    return out


def write_gguf(path: str | Path, architecture: str, metadata: dict[str, MetadataValue],
               tensors: Iterable[PlannedTensor], *, force: bool = False) -> Path:
    """Write a GGUF file: `metadata` (general.architecture is added), then `tensors` in order.

    The file is written to a temporary sibling and renamed over `path` when complete; an
    existing `path` is a ValueError unless force=True. Each tensor's bytes are produced, checked
    against its declared size and written before the next one is produced.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name ending in .gguf")
    if path.exists() and not force:
        raise ValueError(f"output {path} already exists; pass force=True (--force) to replace it")
    tensors = list(tensors)
    with atomic_path(path) as temporary:
        writer = GGUFWriter(temporary, architecture)
        try:
            for key, entry in metadata.items():
                if key == "general.architecture":
                    continue
                writer.add_key_value(key, entry.value, entry.kind, sub_type=entry.item_kind)
            for tensor in tensors:
                nbytes = tensor_nbytes(tensor.shape, tensor.qtype)
                block, type_size = BLOCK_LAYOUTS[tensor.qtype]
                byte_shape = (*tensor.shape[:-1], tensor.shape[-1] // block * type_size)
                writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes,
                                       raw_dtype=tensor.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in tensors:
                data = np.ascontiguousarray(tensor.produce(), dtype=np.uint8)
                expected = tensor_nbytes(tensor.shape, tensor.qtype)
                if data.nbytes != expected:
                    raise ValueError(f"tensor {tensor.name!r} ({tensor.qtype.name}, shape "
                                     f"{tensor.shape}) produced {data.nbytes} bytes, expected "
                                     f"{expected}")
                writer.write_tensor_data(data.reshape(-1))
                del data
            for handle in writer.fout or []:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            writer.close()
    return path
