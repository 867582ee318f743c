"""Post-training quantization of Llama models: RTN, GPTQ, AWQ, SmoothQuant and LLM.int8(), the
sequential calibration driver they share, W8A8 runtime layers and quantized checkpoints.
"""

from lowbit.ptq.awq import awq_quantize
from lowbit.ptq.checkpoint import load_quantized, save_quantized
from lowbit.ptq.driver import run_sequential
from lowbit.ptq.gptq import gptq_quantize, gptq_quantize_weight
from lowbit.ptq.layers import LLMInt8Linear, W8A8Linear
from lowbit.ptq.llm_int8 import llm_int8_quantize
from lowbit.ptq.result import PTQResult, QuantizedLinear
from lowbit.ptq.rtn import rtn_quantize
from lowbit.ptq.smoothquant import smoothquant_quantize

__all__ = [
    "LLMInt8Linear", "PTQResult", "QuantizedLinear", "W8A8Linear", "awq_quantize",
    "gptq_quantize", "gptq_quantize_weight", "llm_int8_quantize", "load_quantized",
    "rtn_quantize", "run_sequential", "save_quantized", "smoothquant_quantize",
]
