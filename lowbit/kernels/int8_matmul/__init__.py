"""W8A8 matmul: int8 activations times int8 weights with int32 accumulation."""

from lowbit.kernels.int8_matmul.api import int8_matmul
from lowbit.kernels.int8_matmul.pallas import DECODE_CONFIG, PREFILL_CONFIG, Int8MatmulConfig
from lowbit.kernels.int8_matmul.reference import int8_matmul_reference

__all__ = ["int8_matmul", "int8_matmul_reference", "Int8MatmulConfig", "DECODE_CONFIG", "PREFILL_CONFIG"]
