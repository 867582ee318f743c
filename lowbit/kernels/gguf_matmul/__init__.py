"""Matmul of activations with GGUF Q4_0 / Q4_1 / Q8_0 weight blocks exactly as stored in the file."""

from lowbit.kernels.gguf_matmul.api import gguf_matmul
from lowbit.kernels.gguf_matmul.reference import GGUF_BLOCKS, dequantize_blocks, gguf_matmul_reference

__all__ = ["gguf_matmul", "gguf_matmul_reference", "dequantize_blocks", "GGUF_BLOCKS"]
