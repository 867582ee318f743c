"""Quantization error of a spec on an array: MSE, SNR in dB and exact packed bits per weight."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.core.spec import QuantSpec

# Specs shown by `lowbit specs` (one per supported kind and the common granularities).
TABLE_SPECS = (
    "int8:channel", "int8:g32", "int6:g64", "int5:g64", "int4:channel", "int4:g128", "int4:g64:asym",
    "int4:g32:asym", "int3:g128", "int3:g64:asym", "int2:g32:asym", "nf4:g64", "nf4:g64:dq",
    "fp4:g32", "fp8_e4m3", "fp8_e5m2", "ternary", "ternary:twn", "binary", "binary:channel",
)


@dataclasses.dataclass(frozen=True)
class QuantError:
    spec: str
    mse: float
    snr_db: float
    bits_per_weight: float


def quantization_error(x, spec: QuantSpec | str, axis: int | None = None) -> QuantError:
    """Error of quantize-dequantize on x and the exact storage cost of the packed result."""
    spec = QuantSpec.parse(spec) if isinstance(spec, str) else spec
    q = quantize(x, spec, axis)
    err = q.dequantize() - jnp.asarray(x, jnp.float32)
    mse = float(jnp.mean(err**2))
    signal = float(jnp.mean(jnp.asarray(x, jnp.float32) ** 2))
    snr = float("inf") if mse == 0 else 10.0 * np.log10(signal / mse)
    return QuantError(str(spec), mse, snr, pack(q).bits_per_weight)


def synthetic_weights(distribution: str, shape=(1024, 1024), seed: int = 0) -> jnp.ndarray:
    """Unit-variance Gaussian or Laplace data (the ACIQ paper's two weight models)."""
    rng = np.random.default_rng(seed)
    if distribution == "gaussian":
        x = rng.standard_normal(shape)
    elif distribution == "laplace":
        x = rng.laplace(scale=1 / np.sqrt(2), size=shape)
    else:
        raise ValueError(f"distribution must be 'gaussian' or 'laplace', got {distribution!r}")
    return jnp.asarray(x, jnp.float32)
