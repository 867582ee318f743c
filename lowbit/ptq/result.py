"""What a post-training quantization run produces: the quantized linears (QArrays plus how they
run), per-layer reconstruction errors, timing, and the exact storage of the linear weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from lowbit.core.packing import pack
from lowbit.core.quantize import QArray

LAYER_KINDS = ("weight_only", "w8a8", "llm_int8")


@dataclasses.dataclass
class QuantizedLinear:
    """One quantized linear of the model.

    weight: the QArray of the kernel [in, out] (after any folded scaling).
    runtime: the layer it became: "weight_only" (a packed layer of lowbit.nn holding the
      codes), "w8a8" (`lowbit.ptq.layers.W8A8Linear`), "llm_int8" (`LLMInt8Linear`).
    options: runtime settings (activation mode and static scale, outlier threshold).
    report: per-layer numbers (reconstruction errors, chosen scales or damping).
    """

    weight: QArray
    runtime: str = "weight_only"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.runtime not in LAYER_KINDS:
            raise ValueError(f"runtime must be one of {LAYER_KINDS}, got {self.runtime!r}")


@dataclasses.dataclass
class PTQResult:
    """The outcome of one method on one model; the model itself was modified in place.

    linears: module path ("layers.3.attn.wq") -> QuantizedLinear, in model order.
    settings: the method's arguments (specs as strings), for the checkpoint and the report.
    block_reports: per-block extras (AWQ's chosen alphas, SmoothQuant's scale ranges).
    storage: (bits, weights) of the linear weights when they are not held as QArrays (llama.cpp's
      K-quant layouts); None: computed from the packed QArrays.
    """

    method: str
    linears: dict[str, QuantizedLinear]
    seconds: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    block_reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    storage: tuple[int, int] | None = None

    def linear_bits(self) -> tuple[int, int]:
        """(packed bits, weights) summed over the linear weights (codes, scales and offsets), as
        the packed layers store them (ternary in 2-bit fields, the format packed_matmul runs)."""
        if self.storage is not None:
            return self.storage
        bits = 0
        count = 0
        for entry in self.linears.values():
            packed = pack(entry.weight, ternary="int2")
            bits += 8 * packed.nbytes
            count += packed.size
        return bits, count

    @property
    def bits_per_weight(self) -> float:
        """Exact storage of the quantized linear weights per weight."""
        bits, count = self.linear_bits()
        return bits / count if count else float("nan")

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary: method, settings, time, bits per weight and per-layer errors."""
        layers = {path: {"spec": str(entry.weight.spec), "runtime": entry.runtime,
                         **_plain(entry.options), **_plain(entry.report)}
                  for path, entry in self.linears.items()}
        return {
            "method": self.method,
            "settings": _plain(self.settings),
            "seconds": round(float(self.seconds), 3),
            "bits_per_weight": float(self.bits_per_weight),
            "linear_weights": self.linear_bits()[1],
            "layers": layers,
            "blocks": [_plain(b) for b in self.block_reports],
        }


def _plain(value: Any) -> Any:
    """Converts numpy / jax scalars and arrays inside dicts and lists to JSON-ready values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, jnp.ndarray)):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def weight_errors(original, quantized, hessian=None) -> dict[str, float]:
    """Reconstruction errors of a kernel [in, out]: relative weight error, and with the input
    Hessian H = 2 X^T X / n ([in, in]) the layer-output MSE per element and its relative size.

    output_mse = ||X (Q - W)||^2 / (n * out), output_rel_error = ||X (Q - W)||^2 / ||X W||^2.
    """
    w = jnp.asarray(original, jnp.float32)
    delta = jnp.asarray(quantized, jnp.float32) - w
    out = {"weight_rel_error": float(jnp.sum(delta * delta) / jnp.maximum(jnp.sum(w * w), 1e-30))}
    if hessian is not None:
        h = jnp.asarray(hessian, jnp.float32)
        err = float(jnp.sum(delta * (h @ delta)))
        ref = float(jnp.sum(w * (h @ w)))
        out["output_mse"] = err / (2.0 * w.shape[1])
        out["output_rel_error"] = err / ref if ref > 0 else float("nan")
    return out
