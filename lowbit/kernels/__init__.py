"""Kernels, one folder per op (reference.py, pallas.py, native.py, api.py); call them through these names."""

from lowbit.kernels.decode_attention import DecodeAttentionConfig, QuantizedPagePool, decode_attention, quantize_pages
from lowbit.kernels.gguf_matmul import gguf_matmul
from lowbit.kernels.int8_matmul import Int8MatmulConfig, int8_matmul
from lowbit.kernels.packed_matmul import PackedMatmulConfig, packed_matmul

__all__ = [
    "packed_matmul", "PackedMatmulConfig",
    "int8_matmul", "Int8MatmulConfig",
    "gguf_matmul",
    "decode_attention", "DecodeAttentionConfig", "QuantizedPagePool", "quantize_pages",
]
