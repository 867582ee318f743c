"""Post-training quantization of Llama models: RTN, GPTQ, AWQ, SmoothQuant and LLM.int8(), static
activation quantization, mixed precision, the sequential calibration driver they share, runtime
layers and quantized checkpoints.
"""

from lowbit.ptq.act_quant import act_quantize
from lowbit.ptq.awq import awq_quantize
from lowbit.ptq.checkpoint import load_quantized, save_quantized
from lowbit.ptq.driver import run_sequential
from lowbit.ptq.gptq import gptq_quantize, gptq_quantize_weight
from lowbit.ptq.layers import ActQuantLinear, LLMInt8Linear, W8A8Linear
from lowbit.ptq.llm_int8 import llm_int8_quantize
from lowbit.ptq.mixed import allocate, layer_sensitivity, mixed_quantize
from lowbit.ptq.result import PTQResult, QuantizedLinear
from lowbit.ptq.rtn import rtn_quantize
from lowbit.ptq.smoothquant import smoothquant_quantize

__all__ = [
    "ActQuantLinear", "LLMInt8Linear", "PTQResult", "QuantizedLinear", "W8A8Linear",
    "act_quantize", "allocate", "awq_quantize", "gptq_quantize", "gptq_quantize_weight",
    "layer_sensitivity", "llm_int8_quantize", "load_quantized", "mixed_quantize", "rtn_quantize",
    "run_sequential", "save_quantized", "smoothquant_quantize",
]
