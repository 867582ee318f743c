import pytest
from hypothesis import given, strategies as st

from lowbit.core import QuantSpec

EXAMPLES = ["int4:g128:asym", "int8:channel", "int8:token", "ternary", "binary:channel", "nf4:g64:dq",
            "fp8_e4m3", "int3:g64:bf16", "int2:g32:asym:clip0.9", "ternary:channel:twn", "fp4:g32:f32"]


@pytest.mark.parametrize("text", EXAMPLES)
def test_string_form_round_trips(text):
    spec = QuantSpec.parse(text)
    assert str(spec) == text
    assert QuantSpec.parse(str(spec)) == spec
    assert hash(spec) == hash(QuantSpec.parse(text))


def test_defaults_and_fields():
    spec = QuantSpec.parse("int4:g128:asym")
    assert (spec.kind, spec.bits, spec.symmetric, spec.granularity, spec.group_size) == ("int", 4, False, "group", 128)
    assert spec.scale_dtype == "f16" and spec.clip is None
    assert (spec.qmin, spec.qmax) == (0, 15)
    assert (QuantSpec.parse("int4").qmin, QuantSpec.parse("int4").qmax) == (-8, 7)


specs = st.builds(
    lambda kind, bits, gran, g, asym, dtype, clip: QuantSpec(
        kind=kind, bits=bits if kind == "int" else {"binary": 1, "ternary": 2, "nf4": 4, "fp4": 4}.get(kind, 8),
        symmetric=not (asym and kind == "int"), granularity=gran, group_size=g if gran == "group" else None,
        scale_dtype=dtype, clip=clip),
    st.sampled_from(["int", "binary", "ternary", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2"]),
    st.integers(2, 8), st.sampled_from(["tensor", "channel", "group", "token"]), st.integers(1, 512),
    st.booleans(), st.sampled_from(["f32", "f16", "bf16"]),
    st.one_of(st.none(), st.sampled_from([0.5, 0.75, 0.9, 0.95])),
)


@given(specs)
def test_any_spec_round_trips_through_its_string(spec):
    assert QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text, fragment", [
    ("int9", "2..8"), ("int1", "2..8"), ("int4:g0", "positive"), ("quux4", "unknown quantization kind"),
    ("int4:g64:wat", "unknown token 'wat'"), ("nf4:asym", "asymmetric"), ("int4:clip1.5", "clip"),
    ("int4:dq", "double_quant"), ("", "non-empty"), ("int4:twn", "ternary_method"),
])
def test_bad_strings_raise_clear_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        QuantSpec.parse(text)


def test_fixed_width_kinds_reject_other_bits():
    with pytest.raises(ValueError, match="fixed at 1"):
        QuantSpec(kind="binary", bits=4)


@pytest.mark.parametrize("clip", [0.9, 0.12345678, 1e-05, 0.7])
def test_clip_ratio_round_trips_exactly(clip):
    spec = QuantSpec(kind="int", bits=4, clip=clip)
    assert QuantSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text, fragment", [
    ("int4:asym:asym", "sets symmetry twice"), ("int4:asym:sym", "sets symmetry twice"),
    ("int4:g64:g32", "sets the granularity twice"), ("int8:channel:token", "sets the granularity twice"),
    ("int4:f16:f32", "sets the scale dtype twice"), ("int4:clip0.9:clip0.8", "sets the clip ratio"),
    ("nf4:g64:dq:dq", "sets double quantization twice"),
    ("ternary:twn:absmean", "sets the ternary method twice"),
])
def test_a_field_given_twice_is_an_error(text, fragment):
    with pytest.raises(ValueError, match=f"spec {text!r} {fragment}"):
        QuantSpec.parse(text)
