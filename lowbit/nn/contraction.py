"""How a layer contracts its kernel, as one [K, N] matrix: `contraction_of(module)` for nnx.Linear,
nnx.LinearGeneral, nnx.Einsum and nnx.Conv, so quantizers, PTQ and packed layers serve all four.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

SUPPORTED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
_PADDING_NAMES = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL", "SAME_LOWER")


class Contraction(abc.ABC):
    """A layer's kernel contraction seen as y_rows = rows(x) @ matrix(kernel).

    matrix(kernel) -> [K, N]: K = the contracted (input) axes of the kernel flattened in the
      kernel's own axis order (last axis fastest), N = its output axes flattened likewise.
      Quantization groups run along K, so a group covers consecutive K entries in that order.
    kernel_from_matrix(m): the exact inverse of `matrix`.
    rows(x) -> [M, K]: the layer's input as rows of that matrix product (Conv: im2col patches).
    output(y_rows, x): [M, N] rows -> the layer's output shape (bias not included).
    bias_row(bias) -> [N]: the layer's bias in the N order of `matrix`, added to y_rows.
    So output(rows(x) @ matrix(kernel) + bias_row(bias), x) == module(x) up to float rounding.
    describe() gives a JSON-able dict; `contraction_from_description` rebuilds the object.
    """

    kernel_shape: tuple

    @property
    @abc.abstractmethod
    def in_features(self) -> int:
        """K: the length of the contraction (each kind of layer says how it counts it)."""

    @property
    def out_features(self) -> int:
        """N: the number of outputs per row."""
        return math.prod(self.kernel_shape) // self.in_features

    def check_kernel(self, kernel) -> None:
        if tuple(kernel.shape) != tuple(self.kernel_shape):
            raise ValueError(f"kernel must have shape {tuple(self.kernel_shape)}, got {tuple(kernel.shape)}")

    def check_matrix(self, m) -> None:
        if tuple(m.shape) != (self.in_features, self.out_features):
            raise ValueError(f"matrix must have shape [K, N] = {(self.in_features, self.out_features)}, "
                             f"got {tuple(m.shape)}")

    # kernels laid out inputs-first (Linear, LinearGeneral, Conv) reshape; Einsum transposes first
    def matrix(self, kernel):
        self.check_kernel(kernel)
        return kernel.reshape(self.in_features, self.out_features)

    def kernel_from_matrix(self, m):
        self.check_matrix(m)
        return m.reshape(self.kernel_shape)


def _ints(values) -> tuple:
    return tuple(int(v) for v in values)


@dataclasses.dataclass(frozen=True)
class DotContraction(Contraction):
    """nnx.Linear and nnx.LinearGeneral: x's `axis` axes (sorted, as nnx.LinearGeneral pairs them)
    meet the kernel's leading in_shape axes; the kernel is [*in_shape, *out_shape] and the output is x's other axes followed
    by out_shape. K = prod(in_shape) in kernel order, N = prod(out_shape)."""

    in_shape: tuple
    out_shape: tuple
    axis: tuple

    kind = "dot"

    def __post_init__(self):
        object.__setattr__(self, "in_shape", _ints(self.in_shape))
        object.__setattr__(self, "out_shape", _ints(self.out_shape))
        object.__setattr__(self, "axis", _ints(self.axis))
        if len(self.axis) != len(self.in_shape) or len(set(self.axis)) != len(self.axis):
            raise ValueError(f"axis {self.axis} must name {len(self.in_shape)} distinct input axes "
                             f"(one per in_shape entry {self.in_shape})")

    @property
    def kernel_shape(self) -> tuple:
        return (*self.in_shape, *self.out_shape)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    def describe(self) -> dict:
        return {"kind": self.kind, "in_shape": list(self.in_shape), "out_shape": list(self.out_shape),
                "axis": list(self.axis)}

    def _axes(self, x) -> tuple:
        if any(not -x.ndim <= a < x.ndim for a in self.axis) or len({a % x.ndim for a in self.axis}) != len(self.axis):
            raise ValueError(f"x of shape {tuple(x.shape)} has no distinct axes {self.axis} to contract")
        axes = tuple(sorted(a % x.ndim for a in self.axis))  # as nnx.LinearGeneral pairs them
        if tuple(x.shape[a] for a in axes) != self.in_shape:
            raise ValueError(f"x must have sizes {self.in_shape} on axes {self.axis}, got shape {tuple(x.shape)}")
        return axes

    def rows(self, x):
        axes = self._axes(x)
        moved = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        return moved.reshape(-1, self.in_features)

    def output(self, y_rows, x):
        axes = self._axes(x)
        lead = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return y_rows.reshape(*lead, *self.out_shape)

    def bias_row(self, bias):
        if bias.size != self.out_features:
            raise ValueError(f"bias must have {self.out_features} entries (shape {self.out_shape}), "
                             f"got shape {tuple(bias.shape)}")
        return bias.reshape(self.out_features)


def _parse_einsum(equation: str, kernel_shape: tuple) -> dict:
    """Split 'lhs,rhs->out' into batch / contracted / output letters, or refuse what is not a
    single [K, N] matrix product."""
    if not isinstance(equation, str) or "->" not in equation or equation.count(",") != 1:
        raise ValueError(f"einsum equation must be explicit 'lhs,rhs->out' with two operands, got {equation!r}")
    operands, result = equation.replace(" ", "").split("->")
    lhs, rhs = operands.split(",")
    if "." in rhs:
        raise ValueError(f"einsum {equation!r}: an ellipsis on the kernel side is not supported")
    ellipsis = "..." in lhs
    if ellipsis != ("..." in result) or lhs.count("...") > 1 or result.count("...") > 1:
        raise ValueError(f"einsum {equation!r}: an ellipsis must appear once in both the input and the output")
    lhs_letters, out_letters = lhs.replace("...", ""), result.replace("...", "")
    for name, letters in (("input", lhs_letters), ("kernel", rhs), ("output", out_letters)):
        if not letters.isalpha() and letters:
            raise ValueError(f"einsum {equation!r}: the {name} subscripts must be letters")
        if len(set(letters)) != len(letters):
            raise ValueError(f"einsum {equation!r}: a repeated {name} subscript (a diagonal) is not supported")
    if len(rhs) != len(kernel_shape):
        raise ValueError(f"einsum {equation!r}: the kernel subscripts {rhs!r} do not match the kernel "
                         f"shape {tuple(kernel_shape)}")
    for c in rhs:
        if c in lhs_letters and c in out_letters:
            raise ValueError(f"einsum {equation!r}: kernel axis {c!r} is also a batch axis of the input "
                             "and output (a batched matmul, one matrix per index), which is not one [K, N] "
                             "matrix; not supported")
        if c not in lhs_letters and c not in out_letters:
            raise ValueError(f"einsum {equation!r}: kernel axis {c!r} is summed away; not supported")
    for c in lhs_letters:
        if c not in rhs and c not in out_letters:
            raise ValueError(f"einsum {equation!r}: input axis {c!r} is summed without the kernel; not supported")
    for c in out_letters:
        if c not in lhs_letters and c not in rhs:
            raise ValueError(f"einsum {equation!r}: output axis {c!r} comes from no operand")
    contracted = "".join(c for c in rhs if c in lhs_letters)
    if not contracted:
        raise ValueError(f"einsum {equation!r} contracts no axis (an outer product); not supported")
    return {"lhs": lhs, "rhs": rhs, "result": result, "ellipsis": "..." if ellipsis else "",
            "batch": "".join(c for c in lhs_letters if c not in rhs), "contracted": contracted,
            "outputs": "".join(c for c in rhs if c in out_letters)}


@dataclasses.dataclass(frozen=True)
class EinsumContraction(Contraction):
    """nnx.Einsum: kernel letters shared with the input are contracted (K, in kernel order),
    kernel letters in the output are output features (N, in kernel order), input letters not in
    the kernel are rows (M). Refused: a kernel letter that is also an input-and-output letter (a
    batched matmul has one matrix per index, not one [K, N] matrix), a summed-away kernel or
    input letter, an ellipsis on the kernel, diagonals, and an equation contracting nothing."""

    equation: str
    kernel_shape: tuple

    kind = "einsum"

    def __post_init__(self):
        object.__setattr__(self, "equation", self.equation.replace(" ", ""))
        object.__setattr__(self, "kernel_shape", _ints(self.kernel_shape))
        object.__setattr__(self, "_parts", _parse_einsum(self.equation, self.kernel_shape))

    def _size(self, letters: str) -> tuple:
        rhs = self._parts["rhs"]
        return tuple(self.kernel_shape[rhs.index(c)] for c in letters)

    @property
    def in_features(self) -> int:
        return math.prod(self._size(self._parts["contracted"]))

    def describe(self) -> dict:
        return {"kind": self.kind, "equation": self.equation, "kernel_shape": list(self.kernel_shape)}

    def _kernel_order(self) -> tuple:
        p = self._parts
        return tuple(p["rhs"].index(c) for c in p["contracted"] + p["outputs"])

    def matrix(self, kernel):
        self.check_kernel(kernel)
        return jnp.transpose(kernel, self._kernel_order()).reshape(self.in_features, self.out_features)

    def kernel_from_matrix(self, m):
        self.check_matrix(m)
        p = self._parts
        blocked = m.reshape(*self._size(p["contracted"]), *self._size(p["outputs"]))
        order = self._kernel_order()
        return jnp.transpose(blocked, tuple(order.index(i) for i in range(len(order))))

    def _lead_shape(self, x) -> tuple:
        """Shape of the row axes of x: the ellipsis axes, then the batch letters in input order."""
        p = self._parts
        pre, _, post = p["lhs"].partition("...")
        named = len(pre) + len(post)
        if x.ndim < named or (not p["ellipsis"] and x.ndim != named):
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit einsum input {p['lhs']!r}")
        sizes = dict(zip(pre, x.shape[:len(pre)]))
        sizes.update(zip(post, x.shape[x.ndim - len(post):]))
        for c in p["contracted"]:
            if sizes[c] != self._size(c)[0]:
                raise ValueError(f"x axis {c!r} has size {sizes[c]}, the kernel needs {self._size(c)[0]}")
        middle = tuple(x.shape[len(pre):x.ndim - len(post)]) if p["ellipsis"] else ()
        return middle + tuple(sizes[c] for c in p["batch"])

    def rows(self, x):
        p = self._parts
        self._lead_shape(x)
        order = f"{p['lhs']}->{p['ellipsis']}{p['batch']}{p['contracted']}"
        return jnp.einsum(order, x).reshape(-1, self.in_features)

    def output(self, y_rows, x):
        p = self._parts
        blocked = y_rows.reshape(*self._lead_shape(x), *self._size(p["outputs"]))
        return jnp.einsum(f"{p['ellipsis']}{p['batch']}{p['outputs']}->{p['result']}", blocked)

    def bias_row(self, bias):
        """Flax broadcasts an Einsum bias over the output letters in output order."""
        if bias.size != self.out_features:
            raise ValueError(f"bias must have {self.out_features} entries, got shape {tuple(bias.shape)}")
        p = self._parts
        in_result = "".join(c for c in p["result"] if c in p["outputs"])
        blocked = bias.reshape(self._size(in_result))
        return jnp.transpose(blocked, tuple(in_result.index(c) for c in p["outputs"])).reshape(-1)


def _tuple_of(value, rank: int, name: str) -> tuple:
    if value is None:
        value = 1
    if isinstance(value, int):
        return (int(value),) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"{name} must have {rank} entries, got {value}")
    return value


def _canonical_padding(padding, rank: int):
    """A Conv padding as a name from _PADDING_NAMES or a tuple of (low, high) pairs."""
    if isinstance(padding, str):
        if padding.upper() not in _PADDING_NAMES:
            raise ValueError(f"padding must be one of {_PADDING_NAMES} or (low, high) pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * rank
    pairs = tuple(padding)
    if len(pairs) == 1 and rank > 1:
        pairs = pairs * rank
    out = []
    for pair in pairs:
        pair = (pair, pair) if isinstance(pair, int) else tuple(pair)
        if len(pair) != 2:
            raise ValueError(f"padding pairs must be (low, high), got {padding!r}")
        out.append((int(pair[0]), int(pair[1])))
    if len(out) != rank:
        raise ValueError(f"padding must have {rank} (low, high) pairs, got {padding!r}")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ConvContraction(Contraction):
    """nnx.Conv (channels last, feature_group_count 1): kernel [*window, C_in, N]; K = window x
    C_in flattened in the kernel's own order, so the input channel runs fastest: a group of g
    along K covers g consecutive channels of one window position (then the next position) when
    g <= C_in. rows(x) are the im2col patches of x in that order, one row per output pixel."""

    kernel_shape: tuple
    strides: tuple
    padding: object
    input_dilation: tuple
    kernel_dilation: tuple

    kind = "conv"

    def __post_init__(self):
        shape = _ints(self.kernel_shape)
        rank = len(shape) - 2
        if rank < 1:
            raise ValueError(f"a Conv kernel has at least 3 axes [*window, C_in, N], got {shape}")
        object.__setattr__(self, "kernel_shape", shape)
        object.__setattr__(self, "strides", _tuple_of(self.strides, rank, "strides"))
        object.__setattr__(self, "input_dilation", _tuple_of(self.input_dilation, rank, "input_dilation"))
        object.__setattr__(self, "kernel_dilation", _tuple_of(self.kernel_dilation, rank, "kernel_dilation"))
        padding = _canonical_padding(self.padding, rank)
        if padding == "CAUSAL" and rank != 1:
            raise ValueError("CAUSAL padding is only defined for 1-D convolutions")
        object.__setattr__(self, "padding", padding)

    @property
    def window(self) -> tuple:
        return self.kernel_shape[:-2]

    @property
    def in_features(self) -> int:
        return math.prod(self.kernel_shape[:-1])

    def describe(self) -> dict:
        padding = self.padding if isinstance(self.padding, str) else [list(p) for p in self.padding]
        return {"kind": self.kind, "kernel_shape": list(self.kernel_shape), "strides": list(self.strides),
                "padding": padding, "input_dilation": list(self.input_dilation),
                "kernel_dilation": list(self.kernel_dilation)}

    def _batched(self, x):
        """x -> ([B, *spatial, C], the original leading batch shape), as nnx.Conv flattens it."""
        rank, channels = len(self.window), self.kernel_shape[-2]
        if x.ndim < rank + 1 or x.shape[-1] != channels:
            raise ValueError(f"x must have shape [..., *spatial ({rank} axes), {channels}], got {tuple(x.shape)}")
        batch = tuple(x.shape[:x.ndim - rank - 1])
        return x.reshape(-1, *x.shape[x.ndim - rank - 1:]), batch

    def _patches(self, x):
        """[B, *out_spatial, K] patches, channel fastest (nnx.Conv's padding modes included)."""
        padding = self.padding
        if padding in ("CIRCULAR", "REFLECT"):
            dilated = [(k - 1) * d + 1 for k, d in zip(self.window, self.kernel_dilation)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
            x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
            padding = "VALID"
        elif padding == "CAUSAL":
            x = jnp.pad(x, [(0, 0), (self.kernel_dilation[0] * (self.window[0] - 1), 0), (0, 0)])
            padding = "VALID"
        rank = len(self.window)
        spatial = "".join("HWDABEFGIJ"[i] for i in range(rank))
        layout = f"N{spatial}C"
        patches = lax.conv_general_dilated_patches(
            x, self.window, self.strides, padding, lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation, dimension_numbers=(layout, f"OI{spatial}", layout),
            precision=lax.Precision.HIGHEST)
        # patches' features are [C, *window] (channel major); reorder to the kernel's [*window, C].
        lead = patches.shape[:-1]
        channels = self.kernel_shape[-2]
        blocked = patches.reshape(*lead, channels, math.prod(self.window))
        return jnp.swapaxes(blocked, -1, -2).reshape(*lead, self.in_features)

    def rows(self, x):
        flat, _ = self._batched(x)
        return self._patches(flat).reshape(-1, self.in_features)

    def output(self, y_rows, x):
        flat, batch = self._batched(x)
        out_spatial = jax.eval_shape(self._patches, flat).shape[1:-1]
        return y_rows.reshape(*batch, *out_spatial, self.out_features)

    def bias_row(self, bias):
        if bias.size != self.out_features:
            raise ValueError(f"bias must have {self.out_features} entries, got shape {tuple(bias.shape)}")
        return bias.reshape(self.out_features)


CONTRACTION_KINDS = {"dot": DotContraction, "einsum": EinsumContraction, "conv": ConvContraction}


def contraction_from_description(description: dict) -> Contraction:
    """Rebuild a Contraction from its `describe()` dict (e.g. read from a checkpoint's JSON)."""
    if not isinstance(description, dict) or description.get("kind") not in CONTRACTION_KINDS:
        raise ValueError(f"description must be a dict with kind in {sorted(CONTRACTION_KINDS)}, got {description!r}")
    fields = {k: v for k, v in description.items() if k != "kind"}
    if description["kind"] == "conv" and isinstance(fields.get("padding"), list):
        fields["padding"] = tuple(tuple(p) for p in fields["padding"])
    return CONTRACTION_KINDS[description["kind"]](**fields)


def supported_base(module) -> type | None:
    """The supported nnx type that `module` is an instance of (None if none)."""
    return next((base for base in SUPPORTED_TYPES if isinstance(module, base)), None)


def _default(base: type, name: str):
    return inspect.signature(base.__init__).parameters[name].default


def check_module(module, path: str = "module") -> type:
    """The supported base of `module`, or ValueError saying why it cannot be treated as one."""
    base = supported_base(module)
    if base is None:
        raise ValueError(f"{path}: {type(module).__name__} is not supported; supported: "
                         f"{[t.__name__ for t in SUPPORTED_TYPES]}")
    if type(module).__call__ is not base.__call__:
        raise ValueError(f"{path}: {type(module).__name__} subclasses nnx.{base.__name__} with its own "
                         "__call__, which a quantized layer would silently replace; not supported (quantize "
                         "the nnx layers inside it instead, or keep it float)")
    custom = {nnx.Linear: ("dot_general",), nnx.LinearGeneral: ("dot_general", "dot_general_cls"),
              nnx.Einsum: ("einsum_op",), nnx.Conv: ("conv_general_dilated",)}[base]
    for name in custom:
        if getattr(module, name, None) is not _default(base, name):
            raise ValueError(f"{path}: nnx.{base.__name__} with a custom {name} is not supported "
                             "(its quantized layer would not call it)")
    if base is nnx.LinearGeneral and module.batch_axis:
        raise ValueError(f"{path}: nnx.LinearGeneral with batch_axis {dict(module.batch_axis)} holds one "
                         "matrix per batch index, not one [K, N] matrix; not supported")
    if base is nnx.Conv:
        if module.feature_group_count != 1:
            raise ValueError(f"{path}: nnx.Conv with feature_group_count={module.feature_group_count} "
                             "(grouped / depthwise convolution) is not supported; only 1")
        if module.mask is not None:
            raise ValueError(f"{path}: nnx.Conv with a weight mask is not supported")
    if base is nnx.Einsum and module.einsum_str is None:
        raise ValueError(f"{path}: nnx.Einsum without an einsum_str (given per call) is not supported")
    return base


def contraction_of(module, path: str = "module") -> Contraction:
    """The Contraction of an nnx.Linear, LinearGeneral, Einsum or Conv (or a subclass that keeps
    its parent's __call__); ValueError naming `path` for anything else (see check_module)."""
    base = check_module(module, path)
    kernel_shape = tuple(module.kernel.get_value().shape)
    if base is nnx.Linear:
        return DotContraction((module.in_features,), (module.out_features,), (-1,))
    if base is nnx.LinearGeneral:
        return DotContraction(module.in_features, module.out_features, module.axis)
    if base is nnx.Einsum:
        try:
            return EinsumContraction(module.einsum_str, kernel_shape)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return ConvContraction(kernel_shape, module.strides, module.padding, module.input_dilation,
                           module.kernel_dilation)
