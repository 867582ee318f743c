"""Runtime layers swapped in by path: W8A8Linear (int8 weights and activations, int8 x int8 -> int32
matmul), LLMInt8Linear (vector-wise int8 plus a float outlier path), both for any layer
lowbit.nn.contraction serves (through its rows / output), and the static input fake-quant layers
ActQuantLinear (in front of any linear) and ActQuantLayer (any contraction, over its input rows).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.core.quantize import QArray
from lowbit.core.spec import QuantSpec
from lowbit.kernels.int8_matmul.api import int8_matmul
from lowbit.nn.contraction import Contraction, contraction_from_description, contraction_of
from lowbit.nn.packed_layer import check_input_scale, register_layer

ACT_MODES = ("token", "tensor", "static")
INT8_MAX = 127


class QuantizedWeight(nnx.Variable):
    """Integer weight codes held by a quantized layer (not a trainable parameter)."""


class QuantScale(nnx.Variable):
    """A quantization scale (weight or static activation scale)."""


def parse_activation_spec(text: str) -> str:
    """The activation mode of a W8A8 activation spec string.

    "int8:token" -> "token" (per-token dynamic, SmoothQuant O1); "int8" or "int8:tensor" ->
    "tensor" (per-tensor dynamic, O2); "int8:tensor:static" (or "int8:static") -> "static"
    (per-tensor scale calibrated once, O3).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"activation spec must be a non-empty string, got {text!r}")
    tokens = text.strip().lower().split(":")
    static = "static" in tokens
    spec = QuantSpec.parse(":".join(t for t in tokens if t != "static"))
    if spec.kind != "int" or spec.bits != 8 or not spec.symmetric:
        raise ValueError(f"activation spec {text!r} must be symmetric int8 (W8A8 runs an int8 x "
                         "int8 matmul)")
    if spec.granularity not in ("token", "tensor"):
        raise ValueError(f"activation spec {text!r} must use token or tensor granularity; "
                         "expected int8:token, int8:tensor or int8:tensor:static")
    if static and spec.granularity != "tensor":
        raise ValueError(f"activation spec {text!r}: static scales are per tensor "
                         "(int8:tensor:static)")
    return "static" if static else spec.granularity


def _safe(s):
    return jnp.where(s == 0, jnp.ones_like(s), s)


def quantize_activations(x, mode: str, static_scale=None) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes of x: [..., features] and their scale (absmax / 127).

    mode "token": one scale per row, [..., 1]; "tensor": one scale for all of x, [];
    "static": the given scale [] (values beyond its range saturate at +-127).
    """
    xf = x.astype(jnp.float32)
    if mode == "token":
        scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / INT8_MAX
    elif mode == "tensor":
        scale = jnp.max(jnp.abs(xf)) / INT8_MAX
    elif mode == "static":
        if static_scale is None:
            raise ValueError("static activation mode needs a static_scale")
        scale = jnp.asarray(static_scale, jnp.float32).reshape(())
    else:
        raise ValueError(f"mode must be one of {ACT_MODES}, got {mode!r}")
    scale = _safe(scale)
    codes = jnp.clip(jnp.round(xf / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return codes, scale


def _check_int8_weight(q: QArray, what: str) -> None:
    spec = q.spec
    if spec.kind != "int" or spec.bits != 8 or not spec.symmetric or q.axis != 0 \
            or spec.granularity not in ("tensor", "channel") or len(q.shape) != 2:
        raise ValueError(f"{what} needs a symmetric int8 kernel [in, out] with tensor or channel "
                         f"scales along axis 0, got {q!r}")


class _RowsLayer(nnx.Module):
    """What W8A8Linear and LLMInt8Linear share: an optional Contraction (None: a plain [in, out]
    linear over x's last axis), float bias (in the contraction's N order) and input scale [K]."""

    def _set_geometry(self, contraction, in_features: int, out_features: int, bias,
                      input_scale) -> None:
        if contraction is not None:
            if not isinstance(contraction, Contraction):
                raise ValueError(f"contraction must be a lowbit.nn.contraction.Contraction or "
                                 f"None, got {type(contraction).__name__}")
            if (contraction.in_features, contraction.out_features) != (in_features,
                                                                        out_features):
                raise ValueError(f"codes are [{in_features}, {out_features}] but the contraction "
                                 f"is [K, N] = [{contraction.in_features}, "
                                 f"{contraction.out_features}]")
        self.contraction = contraction
        if bias is not None:
            bias = jnp.asarray(bias, jnp.float32).reshape(-1)
            if bias.shape != (out_features,):
                raise ValueError(f"bias must hold {out_features} values, got {bias.size}")
        self.bias = nnx.data(None if bias is None else QuantScale(bias))
        self.input_scale = nnx.data(None if input_scale is None else
                                    QuantScale(check_input_scale(input_scale, in_features)))

    def _geometry_state(self, meta: dict, arrays: dict) -> None:
        if self.contraction is not None:
            meta["contraction"] = self.contraction.describe()
        for name in ("bias", "input_scale"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)[...]

    @staticmethod
    def _geometry_from_state(meta: dict, arrays: dict) -> dict:
        description = meta.get("contraction")
        return {"contraction": (None if description is None
                                else contraction_from_description(description)),
                "bias": arrays.get("bias"), "input_scale": arrays.get("input_scale")}

    def _rows(self, x):
        rows = x if self.contraction is None else self.contraction.rows(x)
        if self.input_scale is not None:
            rows = rows * self.input_scale[...].astype(rows.dtype)
        return rows

    def _output(self, y, x):
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x.dtype) if self.contraction is None else \
            self.contraction.output(y, x).astype(x.dtype)


def _module_geometry(module, path: str) -> dict:
    """contraction and bias (in N order) of a float module, for from_module."""
    contraction = contraction_of(module, path)
    bias = getattr(module, "bias", None)
    return {"contraction": contraction,
            "bias": None if bias is None else contraction.bias_row(jnp.asarray(bias[...]))}


class W8A8Linear(_RowsLayer):
    """y = dequant(int8(x) @ int8(W)) with an int32 accumulator (+ float bias).

    codes: int8 [in, out] (a layer's [K, N] matrix); weight_scale: [out] (per output channel) or
    [] (per tensor); act_mode: "token" | "tensor" (dynamic) | "static" (act_scale, a positive
    scalar). contraction (None: a plain linear over x's last axis): any Linear / LinearGeneral /
    Einsum / Conv geometry, x's rows(x) are quantized and multiplied; bias: [N] float;
    input_scale: [K] multipliers applied to the rows before they are quantized (SmoothQuant's
    1/s where no preceding op can take it).
    """

    def __init__(self, codes, weight_scale, act_mode: str, act_scale: float | None = None, *,
                 dtype: Any = jnp.float32, contraction: Contraction | None = None, bias=None,
                 input_scale=None):
        codes = jnp.asarray(codes)
        if codes.dtype != jnp.int8 or codes.ndim != 2:
            raise ValueError(f"codes must be an int8 [in, out] array, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        weight_scale = jnp.asarray(weight_scale, jnp.float32)
        if weight_scale.size == 1:
            weight_scale = weight_scale.reshape(())
        elif weight_scale.size == codes.shape[1]:
            weight_scale = weight_scale.reshape(-1)
        else:
            raise ValueError(f"weight_scale must hold 1 or {codes.shape[1]} values, got shape "
                             f"{tuple(weight_scale.shape)}")
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
        if act_mode == "static":
            if act_scale is None or not np.isfinite(act_scale) or not act_scale > 0:
                raise ValueError(f"act_scale must be a positive number for static activations, "
                                 f"got {act_scale!r}")
            self.act_scale = QuantScale(jnp.asarray(act_scale, jnp.float32))
        else:
            self.act_scale = None
        self.codes = QuantizedWeight(codes)
        self.weight_scale = QuantScale(weight_scale)
        self.act_mode = act_mode
        self.dtype = jnp.dtype(dtype)
        self._set_geometry(contraction, *codes.shape, bias, input_scale)

    @classmethod
    def from_qarray(cls, q: QArray, act_mode: str, act_scale: float | None = None, *,
                    dtype: Any = jnp.float32, **geometry) -> W8A8Linear:
        """From a symmetric int8 QArray of a kernel [in, out] (tensor or channel scales);
        geometry: contraction, bias, input_scale (see the class)."""
        _check_int8_weight(q, "W8A8Linear")
        return cls(q.codes, q.scale_values(), act_mode, act_scale, dtype=dtype, **geometry)

    @classmethod
    def from_module(cls, module, q: QArray, act_mode: str, act_scale: float | None = None, *,
                    path: str = "module", input_scale=None) -> W8A8Linear:
        """The W8A8 layer of a float nnx.Linear / LinearGeneral / Einsum / Conv: q is the int8
        QArray of its [K, N] matrix; its bias is kept in float."""
        return cls.from_qarray(q, act_mode, act_scale, input_scale=input_scale,
                               **_module_geometry(module, path))

    @property
    def in_features(self) -> int:
        return self.codes[...].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 codes and scales (the static activation scale included)."""
        scale = 0 if self.act_scale is None else self.act_scale[...].nbytes
        return self.codes[...].nbytes + self.weight_scale[...].nbytes + scale

    def layer_state(self) -> tuple[dict, dict]:
        """(JSON-able meta, arrays) for lowbit.save; `from_state` rebuilds the layer."""
        meta = {"class": type(self).__name__, "act_mode": self.act_mode,
                "dtype": jnp.dtype(self.dtype).name}
        arrays = {"codes": self.codes[...], "weight_scale": self.weight_scale[...]}
        if self.act_scale is not None:
            arrays["act_scale"] = self.act_scale[...]
        self._geometry_state(meta, arrays)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> W8A8Linear:
        scale = arrays.get("act_scale")
        return cls(arrays["codes"], arrays["weight_scale"], meta["act_mode"],
                   None if scale is None else float(scale), dtype=jnp.dtype(meta["dtype"]),
                   **cls._geometry_from_state(meta, arrays))

    def __call__(self, x: jax.Array, *, out_sharding=None) -> jax.Array:
        """x: [..., in] -> [..., out] in x's dtype (or, with a contraction, the layer's input
        and output shapes). out_sharding is accepted (nnx.MultiHeadAttention passes it) and
        ignored."""
        static = None if self.act_scale is None else self.act_scale[...]
        codes, scale = quantize_activations(self._rows(x), self.act_mode, static)
        y = int8_matmul(codes, scale, self.codes[...], self.weight_scale[...])
        return self._output(y, x)


class LLMInt8Linear(_RowsLayer):
    """LLM.int8(): input features with any |x| >= threshold (over all rows of this call) are
    multiplied in float; the rest are int8 with one scale per row of x and per output column
    of W, accumulated in int32. The float path gathers only the outlier features' weight rows
    (dequantized from the int8 codes, the only weight stored, as in bitsandbytes' inference
    mode): a [M, max_outliers] x [max_outliers, N] product, never a float matmul over all of K.
    At most max_outliers features (default ceil(K / 8); capped at K), the largest by max |x|,
    take the float path; any further ones stay in int8. threshold None: no outlier path (vector-wise int8).
    contraction / bias / input_scale: as in W8A8Linear (outliers are features of rows(x), K).
    """

    def __init__(self, codes, weight_scale, threshold: float | None = 6.0, *,
                 max_outliers: int | None = None, dtype: Any = jnp.float32,
                 contraction: Contraction | None = None, bias=None, input_scale=None):
        codes = jnp.asarray(codes)
        if codes.dtype != jnp.int8 or codes.ndim != 2:
            raise ValueError(f"codes must be an int8 [in, out] array, got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        weight_scale = jnp.asarray(weight_scale, jnp.float32).reshape(-1)
        if weight_scale.size not in (1, codes.shape[1]):
            raise ValueError(f"weight_scale must hold 1 or {codes.shape[1]} values, got "
                             f"{weight_scale.size}")
        self.codes = QuantizedWeight(codes)
        self.weight_scale = QuantScale(jnp.broadcast_to(weight_scale, (codes.shape[1],)))
        self.threshold = check_threshold(threshold)
        in_features = codes.shape[0]
        if max_outliers is None:
            max_outliers = -(-in_features // 8)
        if isinstance(max_outliers, bool) or not isinstance(max_outliers, int) \
                or max_outliers < 1:
            raise ValueError(f"max_outliers must be a positive integer, got {max_outliers!r}")
        self.max_outliers = min(max_outliers, in_features)
        self.dtype = jnp.dtype(dtype)
        self._set_geometry(contraction, *codes.shape, bias, input_scale)

    @classmethod
    def from_qarray(cls, q: QArray, threshold: float | None = 6.0, *,
                    max_outliers: int | None = None, dtype: Any = jnp.float32,
                    **geometry) -> LLMInt8Linear:
        _check_int8_weight(q, "LLMInt8Linear")
        return cls(q.codes, q.scale_values(), threshold, max_outliers=max_outliers, dtype=dtype,
                   **geometry)

    @classmethod
    def from_module(cls, module, q: QArray, threshold: float | None = 6.0, *,
                    max_outliers: int | None = None, path: str = "module") -> LLMInt8Linear:
        """The LLM.int8() layer of a float nnx.Linear / LinearGeneral / Einsum / Conv: q is the
        int8 QArray of its [K, N] matrix; its bias is kept in float."""
        return cls.from_qarray(q, threshold, max_outliers=max_outliers,
                               **_module_geometry(module, path))

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 codes and the per-column scales."""
        return self.codes[...].nbytes + self.weight_scale[...].nbytes

    def layer_state(self) -> tuple[dict, dict]:
        """(JSON-able meta, arrays) for lowbit.save; `from_state` rebuilds the layer."""
        meta = {"class": type(self).__name__, "threshold": self.threshold,
                "max_outliers": self.max_outliers, "dtype": jnp.dtype(self.dtype).name}
        arrays = {"codes": self.codes[...], "weight_scale": self.weight_scale[...]}
        self._geometry_state(meta, arrays)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> LLMInt8Linear:
        return cls(arrays["codes"], arrays["weight_scale"], meta["threshold"],
                   max_outliers=meta["max_outliers"], dtype=jnp.dtype(meta["dtype"]),
                   **cls._geometry_from_state(meta, arrays))

    def _selected(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(indices [max_outliers], valid [max_outliers]): the features taking the float path."""
        peak = jnp.max(jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), axis=0)
        score = jnp.where(peak >= self.threshold, peak, -1.0)
        values, indices = jax.lax.top_k(score, self.max_outliers)
        return indices, values >= 0

    def outlier_features(self, x: jax.Array) -> jax.Array:
        """[in] bool: the input features (of rows(x), K) routed through the float path for x."""
        rows = self._rows(x)
        if self.threshold is None:
            return jnp.zeros((rows.shape[-1],), bool)
        indices, valid = self._selected(rows)
        return jnp.zeros((rows.shape[-1],), bool).at[indices].max(valid)

    def __call__(self, x: jax.Array, *, out_sharding=None) -> jax.Array:
        """x: [..., in] -> [..., out] in x's dtype (or, with a contraction, the layer's input
        and output shapes); out_sharding is accepted and ignored."""
        xf = self._rows(x).astype(jnp.float32)
        codes = self.codes[...]
        scale = self.weight_scale[...]
        if self.threshold is None:
            x_codes, x_scale = quantize_activations(xf, "token")
            return self._output(int8_matmul(x_codes, x_scale, codes, scale), x)
        indices, valid = self._selected(xf)
        outliers = jnp.zeros((xf.shape[-1],), bool).at[indices].max(valid)
        regular = jnp.where(outliers, 0.0, xf)
        x_codes, x_scale = quantize_activations(regular, "token")
        y = int8_matmul(x_codes, x_scale, codes, scale)
        x_out = jnp.take(xf, indices, axis=-1) * valid.astype(jnp.float32)  # [..., max_outliers]
        rows = jnp.take(codes, indices, axis=0).astype(jnp.float32) * scale[None, :]
        y = y + x_out @ rows
        return self._output(y, x)


def check_threshold(threshold: float | None) -> float | None:
    """A positive finite outlier threshold, or None (no outlier path)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number or None (no outlier path), got "
                         f"{threshold!r}")
    return float(threshold)


def fake_quantize_static(x: jax.Array, threshold, bits: int) -> jax.Array:
    """x: [..., features] through symmetric int of `bits` with a static clip threshold:
    scale = threshold / qmax, codes clipped to [-qmax, qmax] (values beyond saturate), back to
    x's dtype. threshold: [] (per tensor) or [features] (per input channel); 0 maps x to 0.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = jnp.asarray(threshold, jnp.float32) / qmax
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) / _safe(scale)), -qmax, qmax)
    return (codes * scale).astype(x.dtype)


class ActQuantLinear(nnx.Module):
    """y = linear(fake_quant(x)): the input is quantized to symmetric int `bits` with a static,
    calibrated clip threshold, then the wrapped linear (an nnx.Linear, possibly holding a
    fake-quantized kernel, or any other runtime layer) runs in float.

    threshold: a positive scalar (per tensor) or [in] (per input channel). `kernel` is the
    wrapped linear's, so code that reads or rewrites `module.kernel` keeps working.
    """

    def __init__(self, linear: Any, threshold, bits: int):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
        threshold = jnp.asarray(threshold, jnp.float32)
        values = np.asarray(threshold)
        if threshold.ndim > 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"threshold must be a finite non-negative scalar or [in] vector, "
                             f"got shape {tuple(threshold.shape)} with range "
                             f"[{values.min():g}, {values.max():g}]")
        self.linear = linear
        self.act_threshold = QuantScale(threshold)
        self.act_bits = bits

    @property
    def kernel(self):
        return self.linear.kernel

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., out]."""
        return self.linear(fake_quantize_static(x, self.act_threshold[...], self.act_bits))


class ActQuantLayer(nnx.Module):
    """A packed layer (lowbit.nn.PackedLayer, of any Linear / LinearGeneral / Einsum / Conv) whose
    input rows (rows(x), [M, K]) are first fake-quantized to symmetric int `bits` with static,
    calibrated clip thresholds: y = output(layer.multiply_rows(fq(rows(x)))).

    threshold: a non-negative scalar (per tensor) or [K] (per contracted feature).
    """

    def __init__(self, layer: Any, threshold, bits: int):
        from lowbit.nn.packed_layer import PackedLayer

        if not isinstance(layer, PackedLayer):
            raise ValueError(f"layer must be a lowbit.nn.PackedLayer, got {type(layer).__name__}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
        threshold = jnp.asarray(threshold, jnp.float32)
        values = np.asarray(threshold)
        if threshold.shape not in ((), (layer.in_features,)) or not np.all(np.isfinite(values)) \
                or np.any(values < 0):
            raise ValueError(f"threshold must be a finite non-negative scalar or "
                             f"[{layer.in_features}] vector, got shape {tuple(threshold.shape)}")
        self.layer = layer
        self.act_threshold = QuantScale(threshold)
        self.act_bits = bits

    @property
    def nbytes(self) -> int:
        """The packed weight's bytes plus the thresholds'."""
        return self.layer.nbytes + self.act_threshold[...].nbytes

    def layer_state(self) -> tuple[dict, dict]:
        """(JSON-able meta, arrays) for lowbit.save: the inner packed layer's, nested."""
        from lowbit.nn.packed_layer import layer_state

        inner_meta, inner_arrays = layer_state(self.layer)
        arrays = {f"layer.{k}": v for k, v in inner_arrays.items()}
        arrays["act_threshold"] = self.act_threshold[...]
        return {"class": type(self).__name__, "act_bits": self.act_bits,
                "layer": inner_meta}, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> ActQuantLayer:
        from lowbit.nn.packed_layer import layer_from_state

        inner = {k[len("layer."):]: v for k, v in arrays.items() if k.startswith("layer.")}
        return cls(layer_from_state(meta["layer"], inner), arrays["act_threshold"],
                   meta["act_bits"])

    def __call__(self, x: jax.Array, *, out_sharding=None) -> jax.Array:
        """x: the wrapped layer's input -> its output; out_sharding is accepted and ignored."""
        contraction = self.layer.contraction
        rows = fake_quantize_static(contraction.rows(x), self.act_threshold[...], self.act_bits)
        return contraction.output(self.layer.multiply_rows(rows, x.dtype), x)


register_layer(W8A8Linear)
register_layer(LLMInt8Linear)
register_layer(ActQuantLayer)
