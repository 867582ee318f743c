"""Encode float32 arrays (or exact integer codes with their block scales) into ggml blocks of the
types lowbit writes: F32, F16, Q4_0, Q4_1, Q8_0, TQ1_0 and TQ2_0; the inverse of lowbit.models.gguf.blocks.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from lowbit.models.gguf.blocks import BLOCK_LAYOUTS, ggml_type

T = GGMLQuantizationType
ENCODABLE = (T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q8_0, T.TQ1_0, T.TQ2_0)
# Code range of each block type, as signed values for the symmetric ones (Q4_0 stores q + 8,
# the ternary types q + 1) and as stored for Q4_1.
CODE_RANGES = {T.Q4_0: (-8, 7), T.Q4_1: (0, 15), T.Q8_0: (-128, 127), T.TQ1_0: (-1, 1),
               T.TQ2_0: (-1, 1)}


def encodable_type(value) -> GGMLQuantizationType:
    """A ggml type lowbit can encode, given as the enum, its id or its name; ValueError otherwise."""
    qtype = ggml_type(value)
    if qtype not in ENCODABLE:
        raise ValueError(f"ggml type {qtype.name} cannot be encoded by lowbit (supported: "
                         f"{', '.join(t.name for t in ENCODABLE)})")
    return qtype


def block_size(qtype) -> int:
    return BLOCK_LAYOUTS[ggml_type(qtype)][0]


def _rows(values: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, int]:
    """values [..., K] as [n_blocks, block] (and K); K must be a multiple of the block size."""
    values = np.asarray(values)
    if values.ndim == 0:
        raise ValueError("a tensor to encode needs at least one dimension")
    block = BLOCK_LAYOUTS[qtype][0]
    length = values.shape[-1]
    if length % block:
        raise ValueError(f"{qtype.name} needs rows whose length is a multiple of {block}; shape "
                         f"{values.shape} has rows of {length}")
    return values.reshape(-1, block), length


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """[n] float (already f16-exact or to be rounded) -> [n, 2] little-endian fp16 bytes."""
    return np.asarray(values, np.float32).astype("<f2").reshape(-1, 1).view(np.uint8)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[n, 32] codes 0..15 -> [n, 16] bytes: byte j = code j (low nibble) | code j+16 (high)."""
    codes = codes.astype(np.uint8)
    return codes[:, :16] | (codes[:, 16:] << np.uint8(4))


def _base3_bytes(trits: np.ndarray, digits: int) -> np.ndarray:
    """[n, digits, k] trits 0..2 -> [n, k] bytes; digit t (most significant first) of byte i is
    trits[:, t, i], padded to 5 digits with zeros at the bottom; stored as ceil(q * 256 / 243)."""
    value = np.zeros(trits.shape[::2], np.uint16)
    for t in range(digits):
        value = value * 3 + trits[:, t, :].astype(np.uint16)
    value = value * np.uint16(3 ** (5 - digits))
    return ((value * 256 + 242) // 243).astype(np.uint8)


def _pack(qtype: GGMLQuantizationType, q: np.ndarray, d: np.ndarray, m: np.ndarray | None):
    """Blocks from stored codes q [n, block] (unsigned as stored), f16-exact scales d [n] (and
    Q4_1 minimums m [n]) -> [n, bytes per block] uint8."""
    n = q.shape[0]
    if qtype == T.Q4_0:
        return np.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)
    if qtype == T.Q4_1:
        return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q)], axis=1)
    if qtype == T.Q8_0:
        return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)
    if qtype == T.TQ2_0:
        # element e at byte 32 * (e // 128) + e % 32, bits 2 * ((e % 128) // 32)
        planes = q.astype(np.uint8).reshape(n, 2, 4, 32)
        shifts = (np.arange(4, dtype=np.uint8) * np.uint8(2)).reshape(1, 1, 4, 1)
        packed = np.bitwise_or.reduce(planes << shifts, axis=2).reshape(n, 64)
        return np.concatenate([packed, _f16_bytes(d)], axis=1)
    # TQ1_0: elements 0..159 in qs[0:32] (byte i: i + 32t), 160..239 in qs[32:48] (byte i:
    # 160 + i + 16t), 240..255 in qh[0:4] (byte i: 240 + i + 4t)
    first = _base3_bytes(q[:, :160].reshape(n, 5, 32), 5)
    second = _base3_bytes(q[:, 160:240].reshape(n, 5, 16), 5)
    high = _base3_bytes(q[:, 240:].reshape(n, 4, 4), 4)
    return np.concatenate([first, second, high, _f16_bytes(d)], axis=1)


def _as_f16_exact(values, what: str) -> np.ndarray:
    values = np.asarray(values, np.float32)
    rounded = values.astype(np.float16).astype(np.float32)
    if not np.array_equal(rounded, values) or not np.all(np.isfinite(rounded)):
        raise ValueError(f"{what} must be finite float16 values to be written exactly")
    return values


def encode_codes(codes, scale, zero, qtype) -> np.ndarray:
    """Blocks written from integer codes without any rounding.

    codes: [..., K] integers (Q4_0, Q8_0: signed, in CODE_RANGES; Q4_1: 0..15; TQ1_0 / TQ2_0:
    -1, 0, 1); scale: [..., K // block] float16-exact block scales; zero: the same shape for
    Q4_1 (the real value of code 0), None otherwise. Decoding gives codes * scale (+ zero).
    Returns uint8 [..., K // block * bytes per block]; out-of-range codes or scales that are not
    float16 are a ValueError.
    """
    qtype = encodable_type(qtype)
    if qtype not in CODE_RANGES:
        raise ValueError(f"{qtype.name} is a float type; encode it with encode_values")
    codes = np.asarray(codes)
    blocks, length = _rows(codes, qtype)
    low, high = CODE_RANGES[qtype]
    if blocks.size and (blocks.min() < low or blocks.max() > high):
        raise ValueError(f"{qtype.name} codes must lie in {low}..{high}, got "
                         f"{int(blocks.min())}..{int(blocks.max())}")
    d = _as_f16_exact(scale, f"{qtype.name} scales").reshape(-1)
    if d.size != blocks.shape[0]:
        raise ValueError(f"{qtype.name} needs one scale per block of {BLOCK_LAYOUTS[qtype][0]} "
                         f"({blocks.shape[0]}), got {d.size}")
    m = None
    if qtype == T.Q4_1:
        if zero is None:
            raise ValueError("Q4_1 needs the block minimums (zero)")
        m = _as_f16_exact(zero, "Q4_1 minimums").reshape(-1)
        if m.size != d.size:
            raise ValueError(f"Q4_1 needs one minimum per block ({d.size}), got {m.size}")
    elif zero is not None:
        raise ValueError(f"{qtype.name} is symmetric; zero must be None")
    offset = {T.Q4_0: 8, T.TQ1_0: 1, T.TQ2_0: 1}.get(qtype, 0)
    stored = blocks.astype(np.int16) + offset
    out = _pack(qtype, stored, d, m)
    return out.reshape(*codes.shape[:-1], -1)


def encode_values(values, qtype) -> np.ndarray:
    """Quantize float values [..., K] to a ggml type (rounding to the nearest level of each block).

    Scales are rounded to float16 first and the codes computed against the stored scale:
    Q4_0 d = (the signed value of largest magnitude) / -8; Q4_1 d = (max - min) / 15, m = min;
    Q8_0 d = absmax / 127; TQ1_0 / TQ2_0 d = absmax, codes -1, 0, 1. F32 / F16: the values (F16
    rounded). Returns uint8 [..., K // block * bytes per block] (F32 / F16: their raw bytes).
    """
    qtype = encodable_type(qtype)
    values = np.asarray(values, np.float32)
    if not np.all(np.isfinite(values)):
        raise ValueError("values to encode must be finite (no NaN or inf)")
    if qtype == T.F32:
        return np.ascontiguousarray(values, "<f4").view(np.uint8)
    if qtype == T.F16:
        return np.ascontiguousarray(values.astype("<f2")).view(np.uint8)
    blocks, _ = _rows(values, qtype)
    m = None
    if qtype == T.Q4_0:
        index = np.abs(blocks).argmax(axis=1)
        d = _to_f16(blocks[np.arange(blocks.shape[0]), index] / -8)
        q = np.floor(blocks * _inverse(d)[:, None] + 8.5)
        q = np.clip(q, 0, 15)
    elif qtype == T.Q4_1:
        low, high = blocks.min(axis=1), blocks.max(axis=1)
        d, m = _to_f16((high - low) / 15), _to_f16(low)
        q = np.clip(np.floor((blocks - m[:, None]) * _inverse(d)[:, None] + 0.5), 0, 15)
    elif qtype == T.Q8_0:
        d = _to_f16(np.abs(blocks).max(axis=1) / 127)
        q = np.clip(np.round(blocks * _inverse(d)[:, None]), -127, 127)
    else:
        d = _to_f16(np.abs(blocks).max(axis=1))
        q = np.clip(np.round(blocks * _inverse(d)[:, None]), -1, 1) + 1
    out = _pack(qtype, q.astype(np.int16), d, m)
    return out.reshape(*values.shape[:-1], -1)


def _to_f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    safe = np.where(d == 0, 1, d)
    return np.where(d == 0, 0, 1 / safe).astype(np.float32)
