import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowbit.core import pack, quantize
from lowbit.core import packing


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 41), st.integers(1, 3), st.sampled_from([(1, "bits"), (2, "int2"), (4, "int4"), (3, "planes"), (5, "planes"), (7, "planes")]), st.integers(0, 2**31))
def test_unsigned_packers_round_trip_any_length(n, rows, width_kind, seed):
    bits, kind = width_kind
    u = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n)).astype(np.uint8)
    u = jnp.asarray(u)
    if kind == "planes":
        back = packing.unpack_planes(packing.pack_planes(u, bits), bits, n)
        assert packing.pack_planes(u, bits).shape[-1] == bits * -(-n // 8)
    else:
        p = getattr(packing, f"pack_{kind}")(u)
        back = getattr(packing, f"unpack_{kind}")(p, n)
        assert p.shape[-1] == -(-n // (8 // bits))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(u))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 53), st.integers(0, 2**31))
def test_base3_packs_five_trits_per_byte(n, seed):
    t = jnp.asarray(np.random.default_rng(seed).integers(0, 3, size=(2, n)).astype(np.uint8))
    p = packing.pack_base3(t)
    assert p.shape[-1] == -(-n // 5) and int(p.max()) <= 242
    np.testing.assert_array_equal(np.asarray(packing.unpack_base3(p, n)), np.asarray(t))


def test_layouts_are_the_documented_ones():
    u = jnp.asarray([[1, 2, 3]], jnp.uint8)
    assert packing.pack_int4(u).tolist() == [[0x21, 0x03]]
    assert packing.pack_int2(u).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert packing.pack_bits(jnp.asarray([[1, 0, 1]], jnp.uint8)).tolist() == [[0b101]]
    assert packing.pack_base3(jnp.asarray([[2, 1, 0, 0, 1]], jnp.uint8)).tolist() == [[2 + 3 + 81]]


SPECS = ["int4:g128", "int4:g32:asym", "int2:g16", "int2:g16:asym", "int3:channel", "int8:token", "int6:g64:asym",
         "ternary", "binary:channel", "nf4:g64:dq", "fp4:g32", "fp8_e4m3", "fp8_e5m2:channel"]


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("shape", [(130, 3), (577, 2)])
def test_packed_qarrays_round_trip_exactly(text, shape):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    q = quantize(x, text)
    back = pack(q).unpack()
    np.testing.assert_array_equal(np.asarray(back.codes).view(np.uint8), np.asarray(q.codes).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))


def test_ternary_two_bit_format_round_trips():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((33, 5)), jnp.float32)
    q = quantize(x, "ternary")
    p = pack(q, ternary="int2")
    assert p.format == "int2" and p.data.shape == (9, 5)
    np.testing.assert_array_equal(np.asarray(p.unpack().codes), np.asarray(q.codes))
    with pytest.raises(ValueError, match="base3"):
        pack(q, ternary="int3")


def test_bits_per_weight_accounting():
    big = jnp.asarray(np.random.default_rng(2).standard_normal((4096, 1024)), jnp.float32)
    assert pack(quantize(big, "int4:g128")).bits_per_weight == pytest.approx(4.125)
    assert pack(quantize(big, "int4:g128:asym")).bits_per_weight == pytest.approx(4.25)
    assert pack(quantize(big, "ternary:f32"), ternary="base3").bits_per_weight == pytest.approx(8 * (820 * 1024 + 4) / big.size)  # ceil(4096/5) bytes a column
    assert pack(quantize(big, "ternary:f32"), ternary="base3").bits_per_weight == pytest.approx(1.6, abs=0.002)
    assert pack(quantize(big, "ternary:f32")).bits_per_weight == pytest.approx(2 + 32 / big.size)  # default: 2-bit
    assert pack(quantize(big, "binary:channel")).bits_per_weight == pytest.approx(1 + 16 / 4096)
    assert pack(quantize(big, "nf4:g64:dq")).bits_per_weight == pytest.approx(4.127, abs=1e-3)
    # partial last group: 576 rows in g128 -> 5 groups per column
    p = pack(quantize(big[:576, :8], "int4:g128"))
    assert p.nbytes == 576 * 8 // 2 + 5 * 8 * 2
