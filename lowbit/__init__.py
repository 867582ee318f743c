"""lowbit: low-bit and ternary models in JAX. The names a user needs: specs and quantized arrays
(core), layers and rules for QAT (nn), post-training quantization (ptq), checkpoints, the model.
"""

from lowbit import ptq
from lowbit.checkpoint import load, save
from lowbit.core import PackedArray, QArray, QuantSpec, dequantize, fake_quant, pack, quantize
from lowbit.export import export_gguf
from lowbit.models.llama import Llama, LlamaConfig
from lowbit.models.loader import load_gguf_model
from lowbit.nn import (BitLinear, PackedLayer, QuantLinear, QuantRule, contraction_of, freeze,
                       packed_layer, quantize_model)

import inspect as _inspect


def _show_constructor_signature(cls: type) -> None:
    """help(cls) and inspect.signature(cls) show __init__'s arguments (nnx's metaclass would
    show (*args, **kwargs))."""
    signature = _inspect.signature(cls.__init__)
    cls.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])


for _cls in (BitLinear, Llama, PackedLayer, QuantLinear):
    _show_constructor_signature(_cls)

__all__ = [
    "BitLinear", "Llama", "LlamaConfig", "PackedArray", "PackedLayer", "QArray", "QuantLinear",
    "QuantRule", "QuantSpec", "contraction_of", "dequantize", "export_gguf", "fake_quant",
    "freeze", "load", "load_gguf_model", "pack", "packed_layer", "ptq", "quantize",
    "quantize_model", "save",
]
