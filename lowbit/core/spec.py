"""QuantSpec: what a quantizer does, as a frozen hashable value with a short string form.

The string form (for CLIs and configs) is
`KIND[:GRANULARITY][:ssN][:asym][:SCALE_DTYPE][:clipR][:dq][:twn]`, e.g. `int4:g128:asym`,
`int8:channel`, `int8:token`, `ternary`, `binary:channel`, `nf4:g64:dq`, `int4:g32:ss256:asym`.
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("int", "binary", "ternary", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2")
GRANULARITIES = ("tensor", "channel", "group", "token")
SCALE_DTYPES = ("f32", "f16", "bf16")
TERNARY_METHODS = ("absmean", "twn")

# Code width in bits for every kind but int (whose width is chosen).
_FIXED_BITS = {"binary": 1, "ternary": 2, "nf4": 4, "fp4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8}
SUB_SCALE_BITS = 6  # width of the quantized group scales (and mins) of a super-block spec


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize an array.

    kind: one of KINDS. bits: code width (2..8 for int; fixed for the other kinds).
    symmetric: int only; asymmetric grids store a per-group offset (`zero`).
    granularity: tensor (one scale), channel (one scale per slice along the reduction axis),
      group (groups of `group_size` along the reduction axis; a partial last group is allowed
      and accounted exactly), token (one scale per row, reducing over the last axis).
    scale_dtype: storage dtype of scales and offsets (f16 by default, as in GGUF and GPTQ).
    clip: ratio in (0, 1] applied to the range before computing the scale (None = 1).
    double_quant: NF4/FP4 only: scales quantized to 8 bits in blocks of 256 (QLoRA).
    ternary_method: absmean (BitNet b1.58) or twn (threshold 0.7 mean|w|).
    super_block: int group specs only (llama.cpp's k-quants): every `super_block` weights along
      the reduction axis share one super-scale (and, asymmetric, one super-min) in scale_dtype,
      and each group's scale (and min) is stored as a 6-bit code times it; asymmetric groups
      then keep 0 inside their range (offset = min(group min, 0), as Q4_K). A multiple of
      group_size, at least twice it; a partial last super-block gets its own super-scale.
    """

    kind: str = "int"
    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    group_size: int | None = None
    scale_dtype: str = "f16"
    clip: float | None = None
    double_quant: bool = False
    ternary_method: str = "absmean"
    super_block: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "int":
            if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
                raise ValueError(f"bits for kind 'int' must be an integer in 2..8, got {self.bits!r}")
        elif self.bits != _FIXED_BITS[self.kind]:
            raise ValueError(
                f"bits for kind {self.kind!r} is fixed at {_FIXED_BITS[self.kind]}, got {self.bits!r}"
            )
        if not self.symmetric and self.kind != "int":
            raise ValueError(f"asymmetric quantization is only defined for kind 'int', not {self.kind!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"group_size must be a positive integer for granularity 'group', got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity 'group', got {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.clip is not None and not (0.0 < self.clip <= 1.0):
            raise ValueError(f"clip must be a ratio in (0, 1], got {self.clip!r}")
        if self.double_quant and self.kind not in ("nf4", "fp4"):
            raise ValueError(f"double_quant is only defined for nf4 and fp4, not {self.kind!r}")
        if self.ternary_method not in TERNARY_METHODS:
            raise ValueError(f"ternary_method must be one of {TERNARY_METHODS}, got {self.ternary_method!r}")
        if self.ternary_method != "absmean" and self.kind != "ternary":
            raise ValueError("ternary_method only applies to kind 'ternary'")
        if self.super_block is not None:
            self._check_super_block()

    def _check_super_block(self) -> None:
        if self.kind != "int" or self.granularity != "group":
            raise ValueError(f"super_block (ssN) needs kind 'int' with group granularity (e.g. "
                             f"'int4:g32:ss256'), got kind {self.kind!r}, granularity "
                             f"{self.granularity!r}")
        if isinstance(self.super_block, bool) or not isinstance(self.super_block, int) or \
                self.super_block < 2 * self.group_size or self.super_block % self.group_size:
            raise ValueError(f"super_block must be a multiple of group_size {self.group_size} "
                             f"and at least twice it (e.g. ss{8 * self.group_size}), got "
                             f"{self.super_block!r}")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        """Smallest integer code (int kind)."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer code (int kind)."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def is_float_kind(self) -> bool:
        return self.kind.startswith("fp8")

    @property
    def scale_bits(self) -> int:
        return 32 if self.scale_dtype == "f32" else 16

    @property
    def groups_per_super_block(self) -> int | None:
        return None if self.super_block is None else self.super_block // self.group_size

    def sub_scale_spec(self) -> "QuantSpec | None":
        """How a super-block spec stores its group scales (and mins): unsigned 6-bit codes in
        groups of groups_per_super_block along the groups axis, times a scale_dtype super-scale,
        no offset (asym: codes 0..63). None without super-blocks."""
        if self.super_block is None:
            return None
        return QuantSpec(kind="int", bits=SUB_SCALE_BITS, symmetric=False, granularity="group",
                         group_size=self.groups_per_super_block, scale_dtype=self.scale_dtype)

    # ---- string form ---------------------------------------------------------------------
    def __str__(self) -> str:
        parts = [f"int{self.bits}" if self.kind == "int" else self.kind]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
            if self.super_block is not None:
                parts.append(f"ss{self.super_block}")
        elif self.granularity != "tensor":
            parts.append(self.granularity)
        if not self.symmetric:
            parts.append("asym")
        if self.scale_dtype != "f16":
            parts.append(self.scale_dtype)
        if self.clip is not None:
            parts.append(f"clip{self.clip!r}")  # repr: the exact float comes back
        if self.double_quant:
            parts.append("dq")
        if self.ternary_method != "absmean":
            parts.append(self.ternary_method)
        return ":".join(parts)

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse the string form; raises ValueError naming the bad token (or a field set twice)."""
        if isinstance(text, QuantSpec):
            return text
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a quantization spec must be a non-empty string, got {text!r}")
        head, *tokens = text.strip().lower().split(":")
        fields: dict = {}
        m = re.fullmatch(r"int(\d+)", head)
        if m:
            fields.update(kind="int", bits=int(m.group(1)))
        elif head in _FIXED_BITS:
            fields.update(kind=head, bits=_FIXED_BITS[head])
        else:
            raise ValueError(
                f"unknown quantization kind {head!r} in spec {text!r}; expected int2..int8, "
                + ", ".join(_FIXED_BITS)
            )
        given: dict[str, str] = {}  # field name -> the token that set it

        def field(name: str, what: str, tok: str) -> None:
            if name in given:
                raise ValueError(f"spec {text!r} sets {what} twice ({given[name]!r} and {tok!r})")
            given[name] = tok

        for tok in tokens:
            if m := re.fullmatch(r"g(\d+)", tok):
                field("granularity", "the granularity", tok)
                fields.update(granularity="group", group_size=int(m.group(1)))
            elif tok in ("tensor", "channel", "token"):
                field("granularity", "the granularity", tok)
                fields["granularity"] = tok
            elif tok in ("asym", "sym"):
                field("symmetric", "symmetry", tok)
                fields["symmetric"] = tok == "sym"
            elif tok in SCALE_DTYPES:
                field("scale_dtype", "the scale dtype", tok)
                fields["scale_dtype"] = tok
            elif m := re.fullmatch(r"clip([0-9.]+(?:e-?[0-9]+)?)", tok):
                field("clip", "the clip ratio", tok)
                try:
                    fields["clip"] = float(m.group(1))
                except ValueError:
                    raise ValueError(f"bad clip ratio {tok!r} in spec {text!r}") from None
            elif m := re.fullmatch(r"ss(\d+)", tok):
                field("super_block", "the super-block size", tok)
                fields["super_block"] = int(m.group(1))
            elif tok == "dq":
                field("double_quant", "double quantization", tok)
                fields["double_quant"] = True
            elif tok in TERNARY_METHODS:
                field("ternary_method", "the ternary method", tok)
                fields["ternary_method"] = tok
            else:
                raise ValueError(
                    f"unknown token {tok!r} in spec {text!r}; expected gN, ssN, tensor, channel, "
                    "token, asym, sym, f32, f16, bf16, clipR, dq, twn"
                )
        if fields.get("clip") == 1.0:
            fields["clip"] = None
        return cls(**fields)
