"""Numerics only (no Flax): specs, quantize/dequantize, straight-through estimators, packing,
clipping observers."""

from lowbit.core.calibrate import OBSERVERS, aciq_multiplier, clip_ratios, clip_threshold
from lowbit.core.packing import PackedArray, pack
from lowbit.core.quantize import QArray, dequantize, quantize, quantize_dequantize
from lowbit.core.spec import QuantSpec
from lowbit.core.ste import fake_quant, lsq_fake_quant, lsq_init_step, pact_fake_quant

__all__ = [
    "OBSERVERS", "aciq_multiplier", "clip_ratios", "clip_threshold",
    "PackedArray", "QArray", "QuantSpec", "dequantize", "fake_quant", "lsq_fake_quant",
    "lsq_init_step", "pack", "pact_fake_quant", "quantize", "quantize_dequantize",
]
