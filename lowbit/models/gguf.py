"""Read GGUF checkpoints: open them with clear errors, dequantize ggml block types in numpy,
expose Q4_0/Q4_1/Q8_0 tensors losslessly as QArrays, and map llama files to lowbit's names
and [in, out] layout one tensor at a time.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.constants import GGML_QUANT_SIZES

QK_K = 256  # elements per super-block of the k-quants and ternary types

# (elements per block, bytes per block) of every type this module can dequantize.
BLOCK_LAYOUTS: dict[GGMLQuantizationType, tuple[int, int]] = {
    GGMLQuantizationType.F32: (1, 4),
    GGMLQuantizationType.F16: (1, 2),
    GGMLQuantizationType.BF16: (1, 2),
    GGMLQuantizationType.Q4_0: (32, 18),
    GGMLQuantizationType.Q4_1: (32, 20),
    GGMLQuantizationType.Q5_0: (32, 22),
    GGMLQuantizationType.Q5_1: (32, 24),
    GGMLQuantizationType.Q8_0: (32, 34),
    GGMLQuantizationType.Q2_K: (QK_K, 84),
    GGMLQuantizationType.Q3_K: (QK_K, 110),
    GGMLQuantizationType.Q4_K: (QK_K, 144),
    GGMLQuantizationType.Q5_K: (QK_K, 176),
    GGMLQuantizationType.Q6_K: (QK_K, 210),
    GGMLQuantizationType.TQ1_0: (QK_K, 54),
    GGMLQuantizationType.TQ2_0: (QK_K, 66),
}

# Types whose blocks map exactly onto a QArray (codes * scale + zero, groups of 32).
QARRAY_SPECS: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.Q4_0: "int4:g32",
    GGMLQuantizationType.Q4_1: "int4:g32:asym",
    GGMLQuantizationType.Q8_0: "int8:g32",
}


# ---- dequantization ------------------------------------------------------------------------
def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 stored at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].view("<f2").astype(np.float32)


def _bit_planes(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Unpack codes stored as bit planes.

    packed: [n, runs * width] uint8. Each run of `width` bytes holds 8 // bits codes per byte:
    plane p of byte i (bits p*bits .. p*bits+bits-1) is code p*width + i of that run.
    Returns [n, runs * (8 // bits) * width] uint8 codes in that order.
    """
    planes = 8 // bits
    shifts = (np.arange(planes, dtype=np.uint8) * np.uint8(bits)).reshape(1, 1, planes, 1)
    runs = packed.reshape(packed.shape[0], -1, 1, width)
    mask = np.uint8((1 << bits) - 1)
    return ((runs >> shifts) & mask).reshape(packed.shape[0], -1)


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of Q4_K / Q5_K from their 12 packed bytes [n, 12].

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7.
    """
    first, second, low_bits = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first & 63, (low_bits & 15) | ((first >> 6) << 4)], axis=1)
    mins = np.concatenate([second & 63, (low_bits >> 4) | ((second >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _dequantize_q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16_field(b, 0)
    q = _bit_planes(b[:, 2:18], 4, 16).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _dequantize_q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16_field(b, 0), _f16_field(b, 2)
    q = _bit_planes(b[:, 4:20], 4, 16).astype(np.float32)
    return d * q + m


def _five_bit_codes(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 codes: bit j of the little-endian uint32 `high` [n, 4] is bit 4 of code j."""
    fifth = np.unpackbits(high, axis=1, bitorder="little")
    return _bit_planes(low, 4, 16) | (fifth << np.uint8(4))


def _dequantize_q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16_field(b, 0)
    q = _five_bit_codes(b[:, 2:6], b[:, 6:22]).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _dequantize_q5_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16_field(b, 0), _f16_field(b, 2)
    q = _five_bit_codes(b[:, 4:8], b[:, 8:24]).astype(np.float32)
    return d * q + m


def _dequantize_q8_0(b: np.ndarray) -> np.ndarray:
    return _f16_field(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _dequantize_q2_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    packed_scales = b[:, 0:16]
    d, dmin = _f16_field(b, 80), _f16_field(b, 82)
    q = _bit_planes(b[:, 16:80], 2, 32).astype(np.float32).reshape(n, 16, 16)
    scale = (d * (packed_scales & 15).astype(np.float32))[:, :, None]
    offset = (dmin * (packed_scales >> 4).astype(np.float32))[:, :, None]
    return (scale * q - offset).reshape(n, QK_K)


def _dequantize_q3_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    high = _bit_planes(b[:, 0:32], 1, 32).astype(np.int8)
    low = _bit_planes(b[:, 32:96], 2, 32).astype(np.int8)
    q = low - np.int8(4) * (np.int8(1) - high)  # a clear high bit subtracts 4
    packed = b[:, 96:108]
    low_four = _bit_planes(packed[:, 0:8], 4, 8)
    top_two = _bit_planes(packed[:, 8:12], 2, 4)
    six_bit = low_four | (top_two << np.uint8(4))
    sub_scales = (six_bit.astype(np.int8) - np.int8(32)).astype(np.float32)
    scale = (_f16_field(b, 108) * sub_scales)[:, :, None]
    return (scale * q.astype(np.float32).reshape(n, 16, 16)).reshape(n, QK_K)


def _dequantize_q4_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sub_scales, sub_mins = _k_scales_and_mins(b[:, 4:16])
    q = _bit_planes(b[:, 16:144], 4, 32).astype(np.float32).reshape(n, 8, 32)
    return ((d * sub_scales)[:, :, None] * q - (dmin * sub_mins)[:, :, None]).reshape(n, QK_K)


def _dequantize_q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    d, dmin = _f16_field(b, 0), _f16_field(b, 2)
    sub_scales, sub_mins = _k_scales_and_mins(b[:, 4:16])
    fifth = _bit_planes(b[:, 16:48], 1, 32)
    q = _bit_planes(b[:, 48:176], 4, 32) | (fifth << np.uint8(4))
    q = q.astype(np.float32).reshape(n, 8, 32)
    return ((d * sub_scales)[:, :, None] * q - (dmin * sub_mins)[:, :, None]).reshape(n, QK_K)


def _dequantize_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    low = _bit_planes(b[:, 0:128], 4, 64)
    high = _bit_planes(b[:, 128:192], 2, 32)
    q = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    sub_scales = b[:, 192:208].view(np.int8).astype(np.float32)
    scale = (_f16_field(b, 208) * sub_scales)[:, :, None]
    return (scale * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _trits(packed: np.ndarray, digits: int) -> np.ndarray:
    """Base-3 digits of TQ1_0 bytes [n, k] -> [n, digits * k]; digit t of byte i is element t*k+i.

    A byte stores ceil(q * 256 / 243) for q = sum_t trit_t 3^(4-t); multiplying by 3^t (mod 256)
    brings digit t to the top, where (byte * 3) >> 8 reads it.
    """
    powers = (3 ** np.arange(digits)).astype(np.uint8).reshape(1, digits, 1)
    shifted = np.multiply(packed[:, None, :], powers, dtype=np.uint8)
    return ((shifted.astype(np.uint16) * 3) >> 8).reshape(packed.shape[0], -1)


def _dequantize_tq1_0(b: np.ndarray) -> np.ndarray:
    trits = np.concatenate([_trits(b[:, 0:32], 5), _trits(b[:, 32:48], 5), _trits(b[:, 48:52], 4)],
                           axis=1)
    return _f16_field(b, 52) * (trits.astype(np.int8) - np.int8(1)).astype(np.float32)


def _dequantize_tq2_0(b: np.ndarray) -> np.ndarray:
    q = _bit_planes(b[:, 0:64], 2, 32).astype(np.int8) - np.int8(1)
    return _f16_field(b, 64) * q.astype(np.float32)


def _dequantize_f32(b: np.ndarray) -> np.ndarray:
    return b.view("<f4").astype(np.float32)


def _dequantize_f16(b: np.ndarray) -> np.ndarray:
    return b.view("<f2").astype(np.float32)


def _dequantize_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


_DEQUANTIZERS = {
    GGMLQuantizationType.F32: _dequantize_f32,
    GGMLQuantizationType.F16: _dequantize_f16,
    GGMLQuantizationType.BF16: _dequantize_bf16,
    GGMLQuantizationType.Q4_0: _dequantize_q4_0,
    GGMLQuantizationType.Q4_1: _dequantize_q4_1,
    GGMLQuantizationType.Q5_0: _dequantize_q5_0,
    GGMLQuantizationType.Q5_1: _dequantize_q5_1,
    GGMLQuantizationType.Q8_0: _dequantize_q8_0,
    GGMLQuantizationType.Q2_K: _dequantize_q2_k,
    GGMLQuantizationType.Q3_K: _dequantize_q3_k,
    GGMLQuantizationType.Q4_K: _dequantize_q4_k,
    GGMLQuantizationType.Q5_K: _dequantize_q5_k,
    GGMLQuantizationType.Q6_K: _dequantize_q6_k,
    GGMLQuantizationType.TQ1_0: _dequantize_tq1_0,
    GGMLQuantizationType.TQ2_0: _dequantize_tq2_0,
}


def ggml_type(value: GGMLQuantizationType | int | str) -> GGMLQuantizationType:
    """Normalize a ggml type given as the enum, its integer id, or its name ("Q4_1")."""
    if isinstance(value, GGMLQuantizationType):
        return value
    if isinstance(value, str):
        try:
            return GGMLQuantizationType[value.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type name {value!r}") from None
    try:
        return GGMLQuantizationType(int(value))
    except (ValueError, TypeError):
        raise ValueError(f"unknown ggml type {value!r}") from None


def _supported(qtype: GGMLQuantizationType, what: str) -> None:
    if qtype not in _DEQUANTIZERS:
        names = ", ".join(t.name for t in _DEQUANTIZERS)
        raise ValueError(f"{what} has ggml type {qtype.name}, which lowbit cannot dequantize "
                         f"(supported: {names})")


def _raw_blocks(data, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Check `data` against the logical `shape` and view it as [n_blocks, bytes_per_block]."""
    block, type_size = BLOCK_LAYOUTS[qtype]
    if any(dim < 0 for dim in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    if shape and shape[-1] % block:
        raise ValueError(f"the last dimension of shape {shape} must be a multiple of the "
                         f"{qtype.name} block size {block}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(data, dtype=np.uint8)
    else:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    expected = math.prod(shape) // block * type_size
    if raw.size != expected:
        raise ValueError(f"{qtype.name} data for shape {shape} must be {expected} bytes, "
                         f"got {raw.size}")
    return raw.reshape(-1, type_size)


def dequantize_ggml(data, qtype: GGMLQuantizationType | int | str,
                    shape: tuple[int, ...]) -> np.ndarray:
    """Decode ggml tensor data to float32.

    data: the tensor's bytes (bytes or any contiguous numpy array, e.g. GGUFReader's view).
    shape: the logical shape in numpy order, i.e. the reverse of ggml's ne (ne0 is the last,
    fastest axis; blocks run along it). Returns float32 [*shape].
    """
    qtype = ggml_type(qtype)
    _supported(qtype, "data")
    shape = tuple(int(dim) for dim in shape)
    blocks = _raw_blocks(data, qtype, shape)
    return _DEQUANTIZERS[qtype](blocks).reshape(shape)


def qarray_parts(data, qtype: GGMLQuantizationType | int | str, shape: tuple[int, ...]):
    """Exact integer form of a Q4_0 / Q4_1 / Q8_0 tensor, with groups along the last axis.

    Returns (codes [*shape], scale [..., shape[-1] // 32] float16, zero or None, spec string)
    such that codes * scale + zero (scale and zero repeated 32 times along the last axis)
    equals `dequantize_ggml(data, qtype, shape)` exactly. Q4_0: codes int8 in -8..7, symmetric;
    Q4_1: codes uint8 in 0..15, zero = the block minimum m; Q8_0: codes int8, symmetric.
    """
    qtype = ggml_type(qtype)
    if qtype not in QARRAY_SPECS:
        allowed = ", ".join(t.name for t in QARRAY_SPECS)
        raise ValueError(f"ggml type {qtype.name} has no exact QArray form (allowed: {allowed})")
    shape = tuple(int(dim) for dim in shape)
    if not shape:
        raise ValueError("a quantized tensor needs at least one dimension")
    blocks = _raw_blocks(data, qtype, shape)
    group_shape = (*shape[:-1], shape[-1] // 32)
    scale = blocks[:, 0:2].view("<f2").astype(np.float16).reshape(group_shape)
    zero = None
    if qtype == GGMLQuantizationType.Q4_0:
        codes = _bit_planes(blocks[:, 2:18], 4, 16).astype(np.int8) - np.int8(8)
    elif qtype == GGMLQuantizationType.Q4_1:
        zero = blocks[:, 2:4].view("<f2").astype(np.float16).reshape(group_shape)
        codes = _bit_planes(blocks[:, 4:20], 4, 16)
    else:
        codes = blocks[:, 2:34].view(np.int8).copy()
    return codes.reshape(shape), scale, zero, QARRAY_SPECS[qtype]


# ---- opening files -------------------------------------------------------------------------
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


def _as_reader(source: str | Path | GGUFReader) -> GGUFReader:
    return source if isinstance(source, GGUFReader) else open_gguf(source)


_MISSING = object()


def metadata_value(source: str | Path | GGUFReader, key: str, default=_MISSING):
    """A metadata value as a Python object (str, int, float, bool or list)."""
    reader = _as_reader(source)
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
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
    reader = _as_reader(source)
    return [TensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                       int(t.n_bytes)) for t in reader.tensors]


def _find_tensor(reader: GGUFReader, name: str):
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise ValueError(f"{reader.data.filename}: no tensor named {name!r}")


def _require_finite(where, name: str, *arrays) -> None:
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
    reader = _as_reader(source)
    tensor = _find_tensor(reader, name)
    _supported(tensor.tensor_type, f"{reader.data.filename}: tensor {name!r}")
    shape = tuple(int(d) for d in reversed(tensor.shape))
    values = dequantize_ggml(tensor.data, tensor.tensor_type, shape)
    _require_finite(reader.data.filename, name, values)
    return values


# ---- llama checkpoints ---------------------------------------------------------------------
def _number(value) -> float:
    """A float32 metadata value as the shortest float that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def llama_config(source: str | Path | GGUFReader) -> dict:
    """The model configuration of a llama GGUF file, read from its llama.* metadata.

    Keys: vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, rope_base,
    norm_eps, max_seq_len, tied_embeddings.
    """
    reader = _as_reader(source)
    where = reader.data.filename
    arch = metadata_value(reader, "general.architecture", None)
    if arch != "llama":
        raise ValueError(f"{where}: architecture {arch!r} is not supported (only 'llama')")
    scaling = metadata_value(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ValueError(f"{where}: rope scaling {scaling!r} is not supported (only 'none')")

    def key(name, default=_MISSING):
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
    embed_rows = int(_find_tensor(reader, "token_embd.weight").shape[-1])
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


def _llama_plan(config: dict) -> list[tuple[str, str, str, tuple[int, ...]]]:
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
    reader = _as_reader(source)
    where = reader.data.filename
    config = llama_config(reader)
    plan = _llama_plan(config)
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
        _supported(tensor.tensor_type, f"{where}: tensor {gguf_name!r}")
        stored = tuple(int(d) for d in reversed(tensor.shape))
        wanted = shape if conversion == "copy" else shape[::-1]
        if stored != wanted:
            raise ValueError(f"{where}: tensor {gguf_name!r} has shape {stored}, expected {wanted}")
    for name, gguf_name, conversion, _ in plan:
        tensor = tensors[gguf_name]
        stored = tuple(int(d) for d in reversed(tensor.shape))
        if keep_quantized and tensor.tensor_type in QARRAY_SPECS:
            yield name, _llama_qarray(tensor.data, tensor.tensor_type, stored, conversion, config,
                                      where, gguf_name)
        else:
            values = dequantize_ggml(tensor.data, tensor.tensor_type, stored)
            _require_finite(where, gguf_name, values)
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
    _require_finite(where, gguf_name, scale, zero)
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
    reader = _as_reader(source)
    tensor = _find_tensor(reader, name)
    stored = tuple(int(d) for d in reversed(tensor.shape))
    codes, scale, zero, spec = qarray_parts(tensor.data, tensor.tensor_type, stored)
    _require_finite(reader.data.filename, name, scale, zero)
    if transpose and len(stored) == 2:
        return _make_qarray(codes.T, scale.T, None if zero is None else zero.T, spec, 0)
    return _make_qarray(codes, scale, zero, spec, len(stored) - 1)
