"""ggml block types: their layouts, decoding to float32 in numpy, and the exact integer (QArray)
form of Q4_0 / Q4_1 / Q8_0 tensors; the encoders live in lowbit.models.gguf.encode.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType

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


def check_decodable(qtype: GGMLQuantizationType, what: str) -> None:
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
    check_decodable(qtype, "data")
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

