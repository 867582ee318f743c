"""Flax NNX layers for low-bit models: fake-quantized training layers, packed inference layers,
and the rules that convert a float model to them."""

from lowbit.nn.contraction import Contraction, contraction_from_description, contraction_of
from lowbit.nn.gguf_layers import GgufEmbed, GgufLinear, set_activations
from lowbit.nn.lora import (LoRA, LoRAConfig, LoRAParam, add_lora, lora_layers, merge_lora, prepare_qlora,
                            restore_adapters, save_adapters)
from lowbit.nn.packed_layer import PackedLayer, layer_from_state, layer_state, packed_layer
from lowbit.nn.packed_linear import FreezeSummary, PackedLinear, freeze, pack_layer, quantize_kernel
from lowbit.nn.quant_linear import BinaryLinear, BitLinear, QuantLayer, QuantLinear, calibrate
from lowbit.nn.rules import PRESETS, QuantizeReport, QuantRule, preset_rules, quantize_model, unmatched_rules

__all__ = [
    "BinaryLinear", "BitLinear", "Contraction", "GgufEmbed", "GgufLinear", "FreezeSummary", "LoRA", "LoRAConfig", "LoRAParam", "PRESETS", "PackedLayer", "PackedLinear",
    "QuantLayer", "QuantLinear", "QuantRule", "QuantizeReport", "calibrate", "contraction_from_description", "contraction_of",
    "add_lora", "freeze", "layer_from_state", "lora_layers", "merge_lora", "prepare_qlora", "restore_adapters",
    "save_adapters", "layer_state", "pack_layer", "packed_layer", "preset_rules", "quantize_kernel",
    "quantize_model", "set_activations", "unmatched_rules",
]
