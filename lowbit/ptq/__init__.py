"""Post-training quantization of any Flax NNX model: `quantize(model, rules, method=...)` over one
registry of methods (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), static activation quantization,
mixed precision), the sequential calibration driver they share and the runtime layers they make.
"""

from lowbit.ptq.act_quant import act_apply, act_quantize
from lowbit.ptq.awq import awq_apply, awq_quantize
from lowbit.ptq.driver import ModelBlocks, llama_blocks, run_blocks, run_sequential
from lowbit.ptq.embeddings import EMBED_TYPES, quantize_embeddings
from lowbit.ptq.gptq import gptq_apply, gptq_quantize, gptq_quantize_weight
from lowbit.ptq.layers import ActQuantLayer, ActQuantLinear, LLMInt8Linear, W8A8Linear
from lowbit.ptq.llm_int8 import llm_int8_apply, llm_int8_quantize
from lowbit.ptq.methods import METHOD_NAMES, Method, get_method, quantize, run_method
from lowbit.ptq.mixed import allocate, layer_sensitivity, mixed_quantize
from lowbit.ptq.result import PTQResult, QuantizedLinear
from lowbit.ptq.rtn import rtn_apply, rtn_quantize
from lowbit.ptq.scaling import ScaleGroup, llama_scale_groups
from lowbit.ptq.smoothquant import smoothquant_apply, smoothquant_quantize
from lowbit.ptq.targets import Target, resolve_targets

__all__ = [
    "ActQuantLayer", "ActQuantLinear", "EMBED_TYPES", "LLMInt8Linear", "METHOD_NAMES", "Method",
    "ModelBlocks", "PTQResult", "QuantizedLinear", "ScaleGroup", "Target", "W8A8Linear",
    "act_apply", "act_quantize", "allocate", "awq_apply", "awq_quantize", "get_method",
    "gptq_apply", "gptq_quantize", "gptq_quantize_weight", "layer_sensitivity", "llama_blocks",
    "llama_scale_groups", "llm_int8_apply", "llm_int8_quantize", "mixed_quantize", "quantize",
    "quantize_embeddings", "resolve_targets", "rtn_apply", "rtn_quantize", "run_blocks",
    "run_method", "run_sequential", "smoothquant_apply", "smoothquant_quantize",
]
