"""Matmul of activations with bit-packed low-bit weights (int4, int2, nf4/fp4 code books, ternary, binary)."""

from lowbit.kernels.packed_matmul.api import packed_matmul
from lowbit.kernels.packed_matmul.pallas import DECODE_CONFIG, PREFILL_CONFIG, PackedMatmulConfig
from lowbit.kernels.packed_matmul.reference import packed_matmul_reference

__all__ = ["packed_matmul", "packed_matmul_reference", "PackedMatmulConfig", "DECODE_CONFIG", "PREFILL_CONFIG"]
