"""packed_matmul: every implementation against a float64 dequantize-then-matmul, plus bad input."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core.packing import pack
from lowbit.core.quantize import QArray, quantize
from lowbit.core.spec import QuantSpec
from lowbit.kernels.dispatch import resolve_impl
from lowbit.kernels.packed_matmul import (
    DECODE_CONFIG,
    PREFILL_CONFIG,
    PackedMatmulConfig,
    packed_matmul,
    packed_matmul_reference,
)
from lowbit.kernels.packed_matmul.pallas import packed_matmul_pallas, plan_tiles
from lowbit.kernels.packed_matmul.reference import weight_format

# LOWBIT_KERNEL_TEST_DEVICE=gpu runs the Pallas classes compiled for the GPU instead of interpreted.
PALLAS_INTERPRET = os.environ.get("LOWBIT_KERNEL_TEST_DEVICE", "cpu") != "gpu"
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@functools.partial(jax.jit, static_argnames=("spec", "ternary"))
def _quantize_and_pack(w, spec, ternary):
    packed = pack(quantize(w, spec), ternary=ternary)
    return packed, packed.dequantize()


_DEQUANTIZED = {}


@functools.lru_cache(maxsize=None)
def _packed(spec, k, n, seed=0, ternary="base3"):
    """A random [k, n] weight quantized with `spec` and packed (cached: shared by all classes)."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    packed, dense = _quantize_and_pack(w, spec, ternary)
    _DEQUANTIZED[id(packed)] = np.asarray(dense, np.float64)
    return packed


def _expected(x, pw):
    dense = _DEQUANTIZED.get(id(pw))
    if dense is None:
        dense = np.asarray(pw.dequantize(), np.float64)
    return np.asarray(x, np.float64) @ dense


def _relative_error(y, expected):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return np.abs(y - expected).max() / max(np.abs(expected).max(), 1e-30)


class PackedMatmulBase:
    impl: str = "xla"
    interpret: bool | None = None

    def matmul(self, x, w, **kwargs):
        return packed_matmul(x, w, impl=self.impl, interpret=self.interpret, **kwargs)

    def check(self, x, pw, dtype=jnp.float32, **kwargs):
        x = jnp.asarray(x, dtype)
        y = self.matmul(x, pw, **kwargs)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], pw.shape[1])
        err = _relative_error(y, _expected(jnp.asarray(x, jnp.float32), pw))
        assert err < TOLERANCE[dtype], err

    # Every format, decode (M <= 16) and prefill (M > 16) shapes, none a tile multiple.
    @pytest.mark.parametrize(
        "spec, ternary, m, k, n",
        [
            ("int4:g64", "base3", 3, 384, 80),
            ("int4:g32:asym", "base3", 70, 256, 40),
            ("int4:channel", "base3", 1, 200, 24),
            ("int2:g64", "base3", 5, 256, 72),
            ("int2:channel:asym", "base3", 33, 190, 50),
            ("ternary:g64", "int2", 2, 320, 48),
            ("binary:channel", "base3", 4, 136, 40),
            ("binary:g128", "base3", 66, 256, 17),
            ("binary:g8", "base3", 2, 128, 24),
        ],
    )
    def test_formats(self, spec, ternary, m, k, n):
        pw = _packed(spec, k, n, ternary=ternary)
        x = np.random.default_rng(1).standard_normal((m, k))
        self.check(x, pw)

    @pytest.mark.parametrize("spec", ["int4:g128", "int2:g32:asym", "binary:channel"])
    def test_bfloat16_activations(self, spec):
        pw = _packed(spec, 256, 96)
        x = np.random.default_rng(2).standard_normal((4, 256))
        self.check(x, pw, dtype=jnp.bfloat16)

    def test_leading_dims_and_tensor_scale(self):
        pw = _packed("int4", 128, 32)
        x = np.random.default_rng(3).standard_normal((2, 3, 128))
        self.check(x, pw)

    def test_non_power_of_two_group(self):
        pw = _packed("int4:g96", 288, 40)
        x = np.random.default_rng(4).standard_normal((3, 288))
        self.check(x, pw)

    def test_all_zero_groups(self):
        w = np.random.default_rng(5).standard_normal((256, 48)).astype(np.float32)
        w[64:128] = 0.0
        w[:, 7] = 0.0
        for spec in ("int4:g64", "int2:g64:asym"):
            pw, _ = _quantize_and_pack(w, spec, "base3")
            x = np.random.default_rng(6).standard_normal((3, 256))
            self.check(x, pw)
            zero_cols = self.matmul(jnp.asarray(x, jnp.float32), pw)[:, 7]
            assert np.all(np.asarray(zero_cols) == 0.0)

    @pytest.mark.parametrize("bits", [4, 2])
    def test_max_magnitude_codes(self, bits):
        spec = QuantSpec(kind="int", bits=bits, granularity="group", group_size=32)
        k, n = 128, 24
        rng = np.random.default_rng(7)
        codes = np.where(rng.random((k, n)) < 0.5, spec.qmin, spec.qmax).astype(np.int8)
        scale = np.full((k // 32, n), 1000.0, np.float16)
        pw = pack(QArray(jnp.asarray(codes), jnp.asarray(scale), None, spec, 0))
        x = np.full((2, k), 50.0)
        x[1] = -x[1]
        self.check(x, pw)

    def test_jit_with_packed_weight_argument(self):
        pw = _packed("int4:g64", 128, 32)
        x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 128)), jnp.float32)
        fn = jax.jit(lambda x, w: packed_matmul(x, w, impl=self.impl, interpret=self.interpret))
        np.testing.assert_allclose(np.asarray(fn(x, pw)), _expected(x, pw), rtol=1e-4, atol=1e-4)

    def test_bad_inputs(self):
        pw = _packed("int4:g64", 128, 32)
        x = jnp.ones((2, 128), jnp.float32)
        with pytest.raises(ValueError, match="x must have shape"):
            self.matmul(jnp.ones((2, 100)), pw)
        with pytest.raises(ValueError, match="x must be float32"):
            self.matmul(jnp.ones((2, 128), jnp.int32), pw)
        with pytest.raises(ValueError, match="w must be a lowbit.core.packing.PackedArray"):
            self.matmul(x, np.ones((128, 32)))
        with pytest.raises(ValueError, match="nearest divisors of 100: 25 below, 50 above"):
            self.matmul(jnp.ones((1, 100)), _packed("int4:g32", 100, 8))
        with pytest.raises(ValueError, match="ternary='int2'"):
            self.matmul(x, _packed("ternary", 128, 32))
        with pytest.raises(ValueError, match="int8_matmul"):
            self.matmul(x, _packed("int8:channel", 128, 32))
        with pytest.raises(ValueError, match="nf4"):
            self.matmul(x, _packed("nf4:g64", 128, 32))
        with pytest.raises(ValueError, match="impl must be one of"):
            packed_matmul(x, pw, impl="triton")
        with pytest.raises(ValueError, match="config must be a PackedMatmulConfig"):
            self.matmul(x, pw, config={"block_m": 16})


class TestPackedMatmulXla(PackedMatmulBase):
    impl = "xla"


class TestPackedMatmulPallas(PackedMatmulBase):
    impl = "pallas"
    interpret = PALLAS_INTERPRET

    def test_explicit_configs_and_split_k(self):
        pw = _packed("int4:g32", 512, 64)
        x = np.random.default_rng(9).standard_normal((3, 512))
        for config in (PackedMatmulConfig(16, 32, 64, split_k=4), PackedMatmulConfig(32, 16, 128, split_k=1)):
            self.check(x, pw, config=config)

    @pytest.mark.parametrize(
        "spec, m, dtype",
        [("int4:g128", 1, jnp.bfloat16), ("int2:g64:asym", 64, jnp.float16), ("binary:channel", 8, jnp.float32)],
    )
    def test_lowers_to_triton(self, spec, m, dtype):
        """The kernel lowers to Triton IR (power-of-two tiles, supported ops) without a GPU."""
        pw = _packed(spec, 4096 if m == 1 else 512, 256)
        fmt = weight_format(pw)
        plan = plan_tiles(m, pw.shape[0], pw.shape[1], fmt, DECODE_CONFIG if m <= 16 else PREFILL_CONFIG,
                          interpret=False)
        fn = jax.jit(lambda x, d, s, z: packed_matmul_pallas(x, d, s, z, fmt=fmt, plan=plan, interpret=False))
        x = jax.ShapeDtypeStruct((m, pw.shape[0]), dtype)
        text = fn.trace(x, pw.data, pw.scale, pw.zero).lower(lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text


def test_reference_matches_plain_dequantize_then_dot():
    for spec, ternary in [("int4:g64:asym", "base3"), ("ternary:g32", "int2"), ("binary:g64", "base3")]:
        pw = _packed(spec, 192, 40, ternary=ternary)
        x = jnp.asarray(np.random.default_rng(10).standard_normal((5, 192)), jnp.float32)
        plain = np.asarray(x, np.float64) @ _DEQUANTIZED[id(pw)]  # core unpack + dequantize, then dot
        np.testing.assert_allclose(np.asarray(packed_matmul_reference(x, pw)), plain, rtol=1e-5, atol=1e-4)


@settings(max_examples=8, deadline=None)
@given(
    bits=st.sampled_from(["int4", "int2", "binary"]),
    groups=st.integers(1, 3),
    group_size=st.sampled_from([8, 16, 32]),
    m=st.integers(1, 9),
    n=st.integers(1, 20),
    asym=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reference_property(bits, groups, group_size, m, n, asym, seed):
    spec = f"{bits}:g{group_size}" + (":asym" if asym and bits != "binary" else "")
    k = groups * group_size
    pw = _packed(spec, k, n, seed=seed)
    x = np.random.default_rng(seed + 1).standard_normal((m, k))
    y = packed_matmul(jnp.asarray(x, jnp.float32), pw, impl="xla")
    assert _relative_error(y, _expected(x, pw)) < 2e-5


def test_resolve_impl():
    expected_auto = ("pallas", False) if jax.default_backend() == "gpu" else ("xla", False)
    assert resolve_impl("auto", None) == expected_auto
    assert resolve_impl("auto", True) == ("pallas", True)
    assert resolve_impl("xla", True) == ("xla", False)
    assert resolve_impl("pallas", True) == ("pallas", True)
    with pytest.raises(ValueError, match="interpret must be"):
        resolve_impl("pallas", "yes")
    if jax.default_backend() != "gpu":
        assert resolve_impl("pallas", None) == ("pallas", True)
        with pytest.raises(ValueError, match="interpret=False needs a GPU"):
            resolve_impl("pallas", False)


def test_config_validation():
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        PackedMatmulConfig(block_m=16, block_n=48, block_k=128)
    with pytest.raises(ValueError, match="split_k"):
        PackedMatmulConfig(block_m=16, block_n=64, block_k=128, split_k=0)


def test_triton_tiling_limits():
    """Group sizes the GPU kernel cannot tile raise there; interpret mode still tiles them."""
    fmt = weight_format(_packed("int2:g96", 192, 16))
    with pytest.raises(ValueError, match="needs >= 16 packed rows"):
        plan_tiles(4, 192, 16, fmt, DECODE_CONFIG, interpret=False)
    plan = plan_tiles(4, 192, 16, fmt, DECODE_CONFIG, interpret=True)
    assert plan.block_k == 32 and plan.groups_per_tile == 1 and plan.k_padded == 192
