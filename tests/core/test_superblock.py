"""Super-block scales (ssN, llama.cpp's k-quants): the spec string, exact bit accounting, the
6-bit group-scale codes and the grid they rebuild, and the error against f16 group scales."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.packing import PackedSubScales, pack, storage_bits
from lowbit.core.quantize import expand_groups, quantize
from lowbit.core.spec import QuantSpec


def _weights(shape, seed=0):
    """Heavy-tailed weights whose input rows differ in scale (as in a trained linear)."""
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.normal(0, 0.6, (shape[0],) + (1,) * (len(shape) - 1)))
    return (rng.standard_t(4, shape) * 0.02 * rows).astype(np.float32)


def test_spec_string_round_trip_and_bad_combinations():
    spec = QuantSpec.parse("int4:g32:ss256:asym")
    assert (spec.super_block, spec.group_size, spec.symmetric) == (256, 32, False)
    assert str(spec) == "int4:g32:ss256:asym" and QuantSpec.parse(str(spec)) == spec
    assert str(spec.sub_scale_spec()) == "int6:g8:asym"
    for bad, match in [("int4:ss256", "group granularity"), ("nf4:g32:ss256", "kind 'int'"),
                       ("int4:g32:ss48", "multiple of group_size"),
                       ("int4:g32:ss32", "at least twice"), ("int4:g32:ss256:ss512", "twice")]:
        with pytest.raises(ValueError, match=match):
            QuantSpec.parse(bad)


@pytest.mark.parametrize("spec, bpw", [
    ("int4:g32:ss256:asym", 4.5),      # Q4_K: 4 + (6 + 6) / 32 + (16 + 16) / 256
    ("int4:g32:ss256", 4.25),          # 4 + 6 / 32 + 16 / 256
    ("int3:g32:ss256", 3.25),
    ("int3:g16:ss256", 3.4375),        # Q3_K's 16-weight sub-blocks
    ("int4:g32", 4.5), ("int4:g64", 4.25), ("int3:g64", 3.25),
])
def test_bits_per_weight_formula_on_whole_super_blocks(spec, bpw):
    shape = (512, 24)
    q = quantize(_weights(shape), spec)
    packed = pack(q)
    assert packed.bits_per_weight == bpw
    assert 8 * packed.nbytes == storage_bits(q.spec, shape)


@pytest.mark.parametrize("shape, axis", [((576, 40), 0), ((1536, 8), 0), ((40, 576), 1),
                                         ((100,), 0), ((3, 96, 5), 1)])
@pytest.mark.parametrize("spec", ["int4:g32:ss256", "int3:g32:ss256:asym", "int2:g16:ss64:asym"])
def test_partial_super_blocks_store_exactly_what_the_formula_counts(shape, axis, spec):
    q = quantize(_weights(shape, 1), spec, axis=axis)
    packed = pack(q)
    assert 8 * packed.nbytes == storage_bits(q.spec, shape, axis)
    assert isinstance(packed.scale, PackedSubScales)
    np.testing.assert_array_equal(packed.dequantize(), q.dequantize())
    n = shape[axis]
    supers = -(-(-(-n // q.spec.group_size)) // q.spec.groups_per_super_block)
    assert q.scale.scale.shape[axis] == supers


@pytest.mark.parametrize("spec", ["int4:g32:ss256", "int4:g32:ss256:asym", "int3:g16:ss128"])
def test_sub_scale_codes_are_six_bits_and_rebuild_the_grid(spec):
    w = _weights((576, 32), 2)
    q = quantize(w, spec)
    assert q.scale.codes.dtype == jnp.uint8 and int(q.scale.codes.max()) == 63  # max of each block
    groups = q.scale.codes.shape[0]
    per = q.spec.groups_per_super_block
    super_scale = expand_groups(q.scale.scale.astype(jnp.float32), q.spec.sub_scale_spec(), 0,
                                groups)
    grid = q.scale.codes.astype(jnp.float32) * super_scale
    np.testing.assert_array_equal(q.scale_values(), grid)
    # each super-block's largest group scale is exactly 63 times its super-scale
    np.testing.assert_array_equal(np.asarray(q.scale.codes[:per]).max(0), 63)
    offsets = 0.0
    if not q.spec.symmetric:
        assert int(q.zero.codes.max()) <= 63 and bool((q.zero.scale <= 0).all())
        offsets = expand_groups(q.zero_values(), q.spec, 0, 576)
        assert bool((q.zero_values() <= 0).all())
    dequant = q.codes.astype(jnp.float32) * expand_groups(grid, q.spec, 0, 576) + offsets
    np.testing.assert_allclose(q.dequantize(), dequant, rtol=0, atol=1e-7)


def test_codes_are_rounded_on_the_quantized_grid():
    w = _weights((256, 16), 3)
    q = quantize(w, "int4:g32:ss256")
    scale = expand_groups(q.scale_values(), q.spec, 0, 256)
    expected = np.clip(np.round(w / np.where(scale == 0, 1, scale)), -7, 7)
    np.testing.assert_array_equal(q.codes, expected)


def test_rtn_error_trend_against_f16_group_scales():
    w = _weights((1536, 96), 4)

    def error(spec):
        return float(np.mean((np.asarray(quantize(w, spec).dequantize()) - w) ** 2))

    for bits in (4, 3):
        fine, cheap, coarse = (error(f"int{bits}:g32"), error(f"int{bits}:g32:ss256"),
                               error(f"int{bits}:g64"))
        assert fine <= cheap <= 1.05 * fine  # 6-bit scales cost at most 5% more error
        assert cheap < 0.95 * coarse         # and beat g64 at the same (sym) bits


def test_asymmetric_super_blocks_and_clip_ratios():
    w = _weights((512, 8), 5) + 0.05  # mostly positive groups: their offset clamps to 0
    q = quantize(w, "int4:g32:ss256:asym")
    assert float(jnp.abs(q.dequantize() - w).max()) <= float(q.scale_values().max())
    clipped = quantize(w, "int4:g32:ss256", clip_ratio=0.9)
    assert float(clipped.scale_values().max()) < float(quantize(w, "int4:g32:ss256")
                                                     .scale_values().max())
