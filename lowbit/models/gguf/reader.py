"""Open GGUF files with clear errors (the header and tensor extents are checked before the gguf
package maps them), read their metadata and dequantize single tensors.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES

from lowbit.models.gguf.blocks import check_decodable, dequantize_ggml

_GGUF_MAGIC = b"GGUF"
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4


class _HeaderProblem(Exception):
    """A defect found while walking a GGUF header."""


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer."""

    def __init__(self, buffer, size: int):
        self.buffer, self.size, self.pos = buffer, size, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """A fixed-size read: running past the end means the file was cut short."""
        if n < 0 or self.pos + n > self.size:
            raise _HeaderProblem(f"file is truncated: {what} at byte {self.pos} needs {n} bytes "
                                 f"but the file has {self.size} bytes")

    def declared(self, n: int, unit: int, what: str) -> None:
        """A count or length read from the file: n items of at least `unit` bytes each must fit
        in the bytes left, checked before anything loops over them."""
        if n * unit > self.left:
            raise _HeaderProblem(f"corrupt header (or truncated file): {what} at byte "
                                 f"{self.pos} declares {n} "
                                 f"(at least {n * unit} bytes) but only {self.left} bytes are "
                                 "left in the file")

    def read(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from("<" + fmt, self.buffer, self.pos)[0]
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str) -> bytes:
        n = self.read("Q", f"length of {what}")
        self.declared(n, 1, f"the length of {what}")
        text = bytes(self.buffer[self.pos:self.pos + n])
        self.pos += n
        return text

    def name(self, what: str) -> str:
        """A key or tensor name: a string that must be UTF-8."""
        start = self.pos
        try:
            return self.string(what).decode("utf-8")
        except UnicodeDecodeError:
            raise _HeaderProblem(f"corrupt header: {what} at byte {start} is not UTF-8") from None


# Smallest encodings: a metadata entry (key length, value type, a one-byte value) and a tensor
# info (name length, dimension count, one dimension, type, offset).
_MIN_METADATA_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


def _skip_value(cursor: _Cursor, value_type: int, key: str) -> None:
    if value_type in _SCALAR_SIZES:
        cursor.skip(_SCALAR_SIZES[value_type], f"value of {key!r}")
    elif value_type == _STRING:
        cursor.string(f"string value of {key!r}")
    elif value_type == _ARRAY:
        item_type = cursor.read("I", f"array type of {key!r}")
        count = cursor.read("Q", f"array length of {key!r}")
        if item_type in _SCALAR_SIZES:
            cursor.declared(count, _SCALAR_SIZES[item_type], f"the length of array {key!r}")
            cursor.skip(count * _SCALAR_SIZES[item_type], f"array {key!r}")
        elif item_type == _STRING:
            cursor.declared(count, 8, f"the length of string array {key!r}")
            for _ in range(count):
                cursor.string(f"an item of {key!r}")
        else:
            raise _HeaderProblem(f"metadata {key!r} is an array of unknown value type {item_type}")
    else:
        raise _HeaderProblem(f"metadata {key!r} has unknown value type {value_type}")


class _Extent(NamedTuple):
    name: str
    qtype: GGMLQuantizationType
    dims: list[int]
    offset: int  # from the start of the data section
    n_bytes: int


def _check_extents(extents: list[_Extent], data_start: int, alignment: int, size: int) -> None:
    """Tensor data must be aligned, inside the file, and laid out back to back (each tensor starts
    where the previous one ends, padded to the alignment), as llama.cpp requires: a type or shape
    field changed in the header shows up as an overlap or a gap."""
    ordered = sorted(extents, key=lambda e: e.offset)
    for extent in ordered:
        if extent.offset % alignment:
            raise _HeaderProblem(f"corrupt header: tensor {extent.name!r} has data offset "
                                 f"{extent.offset}, not a multiple of the alignment {alignment}")
    for this, following in zip(ordered, ordered[1:]):
        end = this.offset + this.n_bytes
        layout = (f"tensor {this.name!r} ({this.qtype.name}, ne {this.dims}) needs "
                  f"{this.n_bytes} bytes from data offset {this.offset}")
        if end > following.offset:
            raise _HeaderProblem(f"corrupt header: {layout}, which overlaps tensor "
                                 f"{following.name!r} at offset {following.offset}; its type "
                                 "or shape does not match the data")
        if -(-end // alignment) * alignment != following.offset:
            raise _HeaderProblem(f"corrupt header: {layout}, which leaves a gap of "
                                 f"{following.offset - end} bytes before tensor "
                                 f"{following.name!r}; its type or shape does not match the data")
    if ordered:
        last = ordered[-1]
        end = data_start + last.offset + last.n_bytes
        if end > size:
            raise _HeaderProblem(f"file is truncated: tensor {last.name!r} ({last.qtype.name}, "
                                 f"ne {last.dims}) data ends at byte {end} but the file has "
                                 f"{size} bytes (or the header's type or shape is corrupt)")


def _check_header(buffer, size: int) -> None:
    """Walk the GGUF header; raise _HeaderProblem naming the first defect found."""
    cursor = _Cursor(buffer, size)
    if size < 4 or bytes(buffer[0:4]) != _GGUF_MAGIC:
        raise _HeaderProblem(f"bad magic {bytes(buffer[0:4])!r} (expected {_GGUF_MAGIC!r}); "
                             "not a GGUF file")
    cursor.pos = 4
    version = cursor.read("I", "version")
    if version & 0xFFFF == 0 and version:
        raise _HeaderProblem("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise _HeaderProblem(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cursor.read("Q", "tensor count")
    n_metadata = cursor.read("Q", "metadata count")
    if n_metadata * _MIN_METADATA_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > cursor.left:
        raise _HeaderProblem(f"corrupt header (or truncated file): it declares {n_metadata} "
                                 f"metadata entries and "
                             f"{n_tensors} tensors, more than the {cursor.left} bytes left in the "
                             "file can hold")
    alignment = 32
    keys: set[str] = set()
    for _ in range(n_metadata):
        key = cursor.name("a metadata key")
        if key in keys:
            raise _HeaderProblem(f"corrupt header: metadata key {key!r} appears twice")
        keys.add(key)
        value_type = cursor.read("I", f"value type of {key!r}")
        if key == "general.alignment" and value_type == _UINT32:
            alignment = cursor.read("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _HeaderProblem(f"general.alignment {alignment} is not a power of two")
        else:
            _skip_value(cursor, value_type, key)
    cursor.declared(n_tensors, _MIN_TENSOR_INFO_BYTES, "the tensor count")
    extents: list[_Extent] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = cursor.name("a tensor name")
        if name in names:
            raise _HeaderProblem(f"corrupt header: tensor name {name!r} appears twice")
        names.add(name)
        n_dims = cursor.read("I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _HeaderProblem(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS})")
        dims = [cursor.read("Q", f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        if 0 in dims:
            raise _HeaderProblem(f"tensor {name!r} has a dimension of 0 (ne {dims})")
        type_id = cursor.read("I", f"type of tensor {name!r}")
        offset = cursor.read("Q", f"data offset of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise _HeaderProblem(f"tensor {name!r} has unknown ggml type id {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise _HeaderProblem(f"tensor {name!r} ({qtype.name}) has a row length {dims[0]} that "
                                 f"is not a multiple of the block size {block}")
        n_bytes = math.prod(dims) // block * type_size
        if n_bytes > size or offset > size:
            raise _HeaderProblem(f"corrupt header: tensor {name!r} ({qtype.name}, ne {dims}) "
                                 f"declares {n_bytes} bytes at data offset {offset}, beyond the "
                                 f"{size} bytes of the file")
        extents.append(_Extent(name, qtype, dims, offset, n_bytes))
    data_start = -(-cursor.pos // alignment) * alignment
    _check_extents(extents, data_start, alignment, size)


def open_gguf(path: str | Path) -> GGUFReader:
    """Open a GGUF file (memory-mapped) after checking its header and tensor extents."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path}: not a valid GGUF file: only {size} bytes (too short)")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            _check_header(buf, size)
        except _HeaderProblem as problem:
            raise ValueError(f"{path}: not a valid GGUF file: {problem}") from None
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError,
            UnicodeDecodeError) as error:
        raise ValueError(f"{path}: could not read GGUF file: {error}") from error


def as_reader(source: str | Path | GGUFReader) -> GGUFReader:
    return source if isinstance(source, GGUFReader) else open_gguf(source)


MISSING = object()


def metadata_value(source: str | Path | GGUFReader, key: str, default=MISSING):
    """A metadata value as a Python object (str, int, float, bool or list)."""
    reader = as_reader(source)
    field = reader.get_field(key)
    if field is None:
        if default is MISSING:
            raise ValueError(f"{reader.data.filename}: metadata key {key!r} is missing")
        return default
    return field.contents()


class TensorInfo(NamedTuple):
    """One tensor of a GGUF file: name, ggml type name, numpy-order shape, stored bytes."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int


def list_tensors(source: str | Path | GGUFReader) -> list[TensorInfo]:
    """The tensors of a GGUF file in file order, for reporting."""
    reader = as_reader(source)
    return [TensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                       int(t.n_bytes)) for t in reader.tensors]


def find_tensor(reader: GGUFReader, name: str):
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise ValueError(f"{reader.data.filename}: no tensor named {name!r}")


def require_finite(where, name: str, *arrays) -> None:
    """A weight that decodes to NaN or inf is a corrupt file, never a number to compute with."""
    for array in arrays:
        if array is None:
            continue
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"{where}: tensor {name!r} decodes to {bad} non-finite values "
                             "(NaN or inf); the file is corrupt")


def read_tensor(source: str | Path | GGUFReader, name: str) -> np.ndarray:
    """Dequantize one tensor to float32 in numpy order (the reverse of ggml's ne); a tensor that
    decodes to NaN or inf is a ValueError naming it."""
    reader = as_reader(source)
    tensor = find_tensor(reader, name)
    check_decodable(tensor.tensor_type, f"{reader.data.filename}: tensor {name!r}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = dequantize_ggml(tensor.data, tensor.tensor_type, shape)
    require_finite(reader.data.filename, name, values)
    return values

