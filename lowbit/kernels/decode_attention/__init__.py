"""Decode attention over a paged KV cache stored as floats or as int8/int4 codes with scales."""

from lowbit.kernels.decode_attention.api import decode_attention
from lowbit.kernels.decode_attention.pages import (
    KV_KINDS,
    QuantizedPagePool,
    dequantize_page_fields,
    interleave_fields,
    quantize_pages,
)
from lowbit.kernels.decode_attention.pallas import DEFAULT_CONFIG, DecodeAttentionConfig
from lowbit.kernels.decode_attention.reference import decode_attention_reference

__all__ = [
    "decode_attention", "decode_attention_reference", "DecodeAttentionConfig", "DEFAULT_CONFIG",
    "QuantizedPagePool", "quantize_pages", "dequantize_page_fields", "interleave_fields", "KV_KINDS",
]
