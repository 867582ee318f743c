"""packed_matmul: every implementation against a float64 dequantize-then-matmul, plus bad input."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from base import KernelTestBase, NativeImpl, PallasImpl, XlaImpl, run_concurrently

from lowbit.core.packing import PackedArray, pack
from lowbit.core.quantize import QArray, quantize
from lowbit.core.spec import QuantSpec
from lowbit.kernels.dispatch import NATIVE_GEMM_ROWS, NATIVE_MAX_ROWS, resolve_impl
from lowbit.kernels.packed_matmul import (
    DECODE_CONFIG,
    PREFILL_CONFIG,
    PackedMatmulConfig,
    packed_matmul,
    packed_matmul_reference,
)
from lowbit.kernels.packed_matmul.pallas import packed_matmul_pallas, plan_tiles
from lowbit.kernels.native import portable_code_only
from lowbit.kernels.packed_matmul.reference import weight_format

BFLOAT16_TOLERANCE = 2e-2


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


class PackedMatmulBase(KernelTestBase):
    def matmul(self, x, w, **kwargs):
        return packed_matmul(x, w, impl=self.impl, interpret=self.interpret, **kwargs)

    def check(self, x, pw, dtype=jnp.float32, **kwargs):
        x = jnp.asarray(x, dtype)
        y = self.matmul(x, pw, **kwargs)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], pw.shape[1])
        err = _relative_error(y, _expected(jnp.asarray(x, jnp.float32), pw))
        assert err < (self.float32_tolerance if dtype == jnp.float32 else BFLOAT16_TOLERANCE), err

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
            ("nf4:g64:dq", "base3", 3, 384, 80),
            ("nf4:g64", "base3", 40, 192, 33),
            ("fp4:g64:dq", "base3", 2, 128, 24),
        ],
    )
    def test_formats(self, spec, ternary, m, k, n):
        pw = _packed(spec, k, n, ternary=ternary)
        x = np.random.default_rng(1).standard_normal((m, k))
        if self.impl == "pallas" and spec[:3] in ("nf4", "fp4"):
            with pytest.raises(ValueError, match="code-book formats"):
                self.matmul(jnp.asarray(x, jnp.float32), pw)
            return
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

    def test_partial_last_group(self):
        """K = 100 with groups of 32: the last group holds 4 rows and its own scale."""
        pw = _packed("int4:g32:asym", 100, 24)
        x = np.random.default_rng(9).standard_normal((3, 100))
        if self.impl == "pallas":
            with pytest.raises(ValueError, match="does not divide K=100"):
                self.matmul(jnp.asarray(x, jnp.float32), pw)
            assert _relative_error(packed_matmul(jnp.asarray(x, jnp.float32), pw, impl="auto", interpret=True),
                                   _expected(x, pw)) < self.float32_tolerance  # "auto" takes XLA
            return
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
        assert _relative_error(fn(x, pw), _expected(x, pw)) < self.float32_tolerance

    def test_bad_inputs(self):
        pw = _packed("int4:g64", 128, 32)
        x = jnp.ones((2, 128), jnp.float32)
        with pytest.raises(ValueError, match="x must have shape"):
            self.matmul(jnp.ones((2, 100)), pw)
        with pytest.raises(ValueError, match="x must be float32"):
            self.matmul(jnp.ones((2, 128), jnp.int32), pw)
        with pytest.raises(ValueError, match="w must be a lowbit.core.packing.PackedArray"):
            self.matmul(x, np.ones((128, 32)))
        with pytest.raises(ValueError, match="ternary='int2'"):
            self.matmul(x, _packed("ternary", 128, 32))
        with pytest.raises(ValueError, match="int8_matmul"):
            self.matmul(x, _packed("int8:channel", 128, 32))
        with pytest.raises(ValueError, match="int8_matmul"):
            self.matmul(x, _packed("fp8_e4m3:channel", 128, 32))
        with pytest.raises(ValueError, match="impl must be one of"):
            packed_matmul(x, pw, impl="triton")
        with pytest.raises(ValueError, match="config must be a PackedMatmulConfig"):
            self.matmul(x, pw, config={"block_m": 16})


_GRADIENT_MEMORY_PROGRAM = r"""
import json
from lowbit.kernels.dispatch import schedule_cpu_for_memory
schedule_cpu_for_memory()
import jax, jax.numpy as jnp, numpy as np
from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.kernels import packed_matmul

layers, width, rows = 8, 512, 32
rng = np.random.default_rng(0)
weights = [pack(quantize(jnp.asarray(rng.normal(size=(width, width)), jnp.float32), "nf4:g64:dq", axis=0))
           for _ in range(layers)]

def loss(x, weights):
    for w in weights:
        x = jnp.tanh(packed_matmul(x, w, impl="xla"))
    return jnp.sum(x)

compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((rows, width), jnp.float32), weights).compile()
print(json.dumps({"temp": compiled.memory_analysis().temp_size_in_bytes, "float_weight": width * width * 4,
                  "layers": layers, "activation": rows * width * 4}))
"""


class TestPackedMatmulXla(PackedMatmulBase, XlaImpl):

    def test_gradient_keeps_no_float_weight_alive(self):
        """The XLA path's input gradient dequantizes W again one tile of rows at a time: the compiled
        gradient of 8 NF4 layers (XLA's memory schedule, as the CLI asks) holds about one float
        weight at a time, not one per layer."""
        import json
        import os
        import subprocess
        import sys

        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        env["JAX_PLATFORMS"] = "cpu"
        done = subprocess.run([sys.executable, "-c", _GRADIENT_MEMORY_PROGRAM], env=env, check=True,
                              capture_output=True, text=True, timeout=300)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        bound = 2 * run["float_weight"] + 2 * run["layers"] * run["activation"]
        assert run["temp"] <= bound, run
        assert bound < run["layers"] * run["float_weight"] / 2

    def test_gradient_equals_the_dequantized_reference(self):
        for spec, k, n in (("nf4:g64:dq", 320, 37), ("int4:channel", 201, 40), ("int2:g64:asym", 192, 48)):
            pw = _packed(spec, k, n)
            dense = np.asarray(pw.dequantize(), np.float64)
            target = np.random.default_rng(22).standard_normal((37, n))
            x = jnp.asarray(np.random.default_rng(23).standard_normal((37, k)), jnp.float32)
            grad = jax.grad(lambda x: jnp.sum(self.matmul(x, pw) * jnp.asarray(target, jnp.float32)))(x)
            assert _relative_error(grad, target @ dense.T) < self.float32_tolerance, spec


class TestPackedMatmulPallas(PackedMatmulBase, PallasImpl):

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


def _with_stat_dtype(pw, dtype):
    """The same packed weight with its scale (and zero) stored in another float dtype."""
    zero = None if pw.zero is None else pw.zero.astype(dtype)
    return PackedArray(pw.data, pw.scale.astype(dtype), zero, pw.spec, pw.axis, pw.shape, pw.format)


class TestPackedMatmulNative(PackedMatmulBase, NativeImpl):
    # sym/asym, g32/g64/g128, channel and tensor scales, ternary and binary; K odd or with a partial
    # last byte, N with and without a tail of < 16 columns; M over the decode and prefill tiles.
    @pytest.mark.parametrize(
        "spec, ternary, k, n",
        [
            ("int4:g32", "base3", 576, 192),
            ("int4:g32:asym", "base3", 96, 53),
            ("int4:g64", "base3", 192, 35),
            ("int4:g64:asym", "base3", 1536, 48),
            ("int4:g128", "base3", 256, 17),
            ("int4:g128:asym", "base3", 384, 33),
            ("int4:channel", "base3", 201, 40),
            ("int4:channel:asym", "base3", 77, 18),
            ("int4", "base3", 63, 16),
            ("int2:g32", "base3", 96, 31),
            ("int2:channel:asym", "base3", 190, 21),
            ("ternary:g64", "int2", 192, 50),
            ("ternary:channel", "int2", 99, 16),
            ("binary:g64", "base3", 128, 19),
        ],
    )
    def test_matches_xla_reference_over_batches(self, spec, ternary, k, n):
        pw = _packed(spec, k, n, ternary=ternary)
        x = jnp.asarray(np.random.default_rng(11).standard_normal((64, k)), jnp.float32)
        reference = np.asarray(packed_matmul(x, pw, impl="xla"), np.float64)  # rows are independent
        for m in (1, 2, 3, 4, 5, 8, 13, 64):
            assert _relative_error(self.matmul(x[:m], pw), reference[:m]) < 1e-5, (spec, m)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
    def test_scale_dtypes(self, dtype):
        pw = _with_stat_dtype(_packed("int4:g32:asym", 128, 40), dtype)
        x = np.random.default_rng(12).standard_normal((3, 128))
        expected = np.asarray(packed_matmul(jnp.asarray(x, jnp.float32), pw, impl="xla"), np.float64)
        assert _relative_error(self.matmul(jnp.asarray(x, jnp.float32), pw), expected) < 1e-5

    @pytest.mark.parametrize("spec, ternary", [("int4:g32:asym", "base3"), ("int4:channel", "base3"),
                                               ("ternary:g64", "int2"), ("binary:g8", "base3")])
    def test_portable_code_matches_reference(self, spec, ternary):
        pw = _packed(spec, 192, 37, ternary=ternary)
        x = jnp.asarray(np.random.default_rng(13).standard_normal((6, 192)), jnp.float32)
        simd = np.asarray(self.matmul(x, pw))
        with portable_code_only():
            portable = np.asarray(self.matmul(x, pw))
        expected = np.asarray(packed_matmul(x, pw, impl="xla"), np.float64)
        assert _relative_error(portable, expected) < 1e-5
        assert _relative_error(simd, expected) < 1e-5

    def test_group_size_not_a_multiple_of_codes_per_byte(self):
        pw = _packed("binary:g4", 64, 16)  # 4 one-bit codes do not fill a byte
        x = jnp.ones((1, 64), jnp.float32)
        with pytest.raises(ValueError, match="codes per byte"):
            self.matmul(x, pw)
        auto = packed_matmul(x, pw, impl="auto")  # "auto" takes the XLA path instead
        assert _relative_error(auto, _expected(x, pw)) < self.float32_tolerance

    def test_two_threads_at_once(self):
        """Two Python threads calling the kernel together each get their own right answer."""
        problems = [(_packed("int4:g64", 1536, 576), 7), (_packed("ternary:g64", 576, 1536, ternary="int2"), 8)]
        fn = jax.jit(lambda x, w: packed_matmul(x, w, impl="native"))
        inputs = [jnp.asarray(np.random.default_rng(seed).standard_normal((2, pw.shape[0])), jnp.float32)
                  for pw, seed in problems]
        results = run_concurrently([lambda i=i: np.asarray(fn(inputs[i], problems[i][0])) for i in range(2)], 20)
        for i, (pw, _) in enumerate(problems):
            expected = _expected(inputs[i], pw)
            assert all(_relative_error(y, expected) < self.float32_tolerance for y in results[i])

    def test_inside_a_jitted_function(self):
        """A jitted two-layer computation through the kernel equals the same through the XLA path."""
        w1, w2 = _packed("int4:g32:asym", 192, 96), _packed("int4:g32", 96, 40)

        def mlp(x, w1, w2, impl):
            return packed_matmul(jax.nn.relu(packed_matmul(x, w1, impl=impl)), w2, impl=impl)

        x = jnp.asarray(np.random.default_rng(14).standard_normal((4, 192)), jnp.float32)
        native = jax.jit(functools.partial(mlp, impl="native"))(x, w1, w2)
        reference = jax.jit(functools.partial(mlp, impl="xla"))(x, w1, w2)
        assert _relative_error(native, np.asarray(reference, np.float64)) < 1e-5

    @pytest.mark.parametrize(
        "spec, ternary, k, n",
        [("int4:g64", "base3", 576, 192), ("int4:g32:asym", "base3", 96, 53), ("int4:channel", "base3", 201, 40),
         ("int4:g128:asym", "base3", 384, 17), ("int2:g32", "base3", 96, 31), ("ternary:g64", "int2", 192, 50),
         ("binary:g64", "base3", 128, 19)],
    )
    def test_gradient_matches_grad_of_the_dequantized_reference(self, spec, ternary, k, n):
        """x-bar = g @ W.T, computed by the transposed native kernel from the packed bytes, equals the
        gradient through the dequantized matrix (float64); the frozen weight gets no gradient."""
        pw = _packed(spec, k, n, ternary=ternary)
        dense = np.asarray(pw.dequantize(), np.float64)
        target = np.random.default_rng(15).standard_normal((NATIVE_MAX_ROWS, n))

        def loss_native(x, w):
            return jnp.sum(self.matmul(x, w) * jnp.asarray(target[:x.shape[0]], jnp.float32))

        def grad_dense(x):  # d/dx sum((x W) * target) = target W.T, in float64
            return target[:x.shape[0]] @ dense.T

        grad = jax.jit(jax.grad(loss_native, argnums=(0, 1), allow_int=True))
        x = jnp.asarray(np.random.default_rng(16).standard_normal((NATIVE_MAX_ROWS, k)), jnp.float32)
        for m in (1, 3, 8, NATIVE_MAX_ROWS):
            x_bar, w_bar = grad(x[:m], pw)
            assert _relative_error(x_bar, grad_dense(x[:m])) < self.float32_tolerance, (spec, m)
            assert not np.any(np.asarray(w_bar.scale))  # frozen: zero cotangent for the scales
        with portable_code_only():
            portable = jax.grad(loss_native)(x[:5], pw)
        assert _relative_error(portable, grad_dense(x[:5])) < self.float32_tolerance

    def test_gradient_reads_the_packed_bytes(self):
        """The backward pass calls the transposed kernel and builds no float [K, N] matrix."""
        pw = _packed("int4:g64", 192, 96)
        grad = jax.grad(lambda x, w: jnp.sum(self.matmul(x, w) ** 2))
        text = jax.jit(grad).lower(jnp.ones((4, 192), jnp.float32), pw).as_text()
        assert "lowbit_packed_matmul_transposed" in text
        assert "tensor<192x96xf32>" not in text and "tensor<96x192xf32>" not in text

    # QLoRA's NF4 blocks of 64 with and without double-quantized scales (FP4 too): K with a partial
    # last byte or an odd number of groups, N with a tail of < 16 columns, rows past NATIVE_MAX_ROWS.
    @pytest.mark.parametrize("spec, k, n", [("nf4:g64:dq", 576, 192), ("nf4:g64:dq", 320, 37), ("nf4:g64", 192, 53),
                                            ("nf4:g64", 64, 16), ("fp4:g64:dq", 128, 35), ("nf4:g128:dq", 384, 17)])
    def test_code_books_forward_and_input_gradient_equal_the_reference(self, spec, k, n):
        """y = x W and x-bar = g W.T from the NF4/FP4 codes (levels looked up in the kernel, the
        double-quantized scales dequantized to one f32 per group) equal dequantize-then-matmul in
        float64, on the SIMD and the portable code, for 1 to 96 rows."""
        pw = _packed(spec, k, n)
        dense = np.asarray(pw.dequantize(), np.float64)
        rng = np.random.default_rng(21)
        x = jnp.asarray(rng.standard_normal((96, k)), jnp.float32)
        target = jnp.asarray(rng.standard_normal((96, n)), jnp.float32)

        def loss(x):
            return jnp.sum(self.matmul(x, pw) * target[:x.shape[0]])

        forward, backward = jax.jit(lambda x: self.matmul(x, pw)), jax.jit(jax.grad(loss))
        for m in (1, 3, 8, 33, 96):
            assert _relative_error(forward(x[:m]), np.asarray(x[:m], np.float64) @ dense) < 1e-5, (spec, m)
            want = np.asarray(target[:m], np.float64) @ dense.T
            assert _relative_error(backward(x[:m]), want) < self.float32_tolerance, (spec, m)
        with portable_code_only():
            assert _relative_error(self.matmul(x[:5], pw), np.asarray(x[:5], np.float64) @ dense) < 1e-5
            assert _relative_error(jax.grad(loss)(x[:5]), np.asarray(target[:5], np.float64) @ dense.T) < 1e-5

    # K not a multiple of the group size: the last group is partial (and for 4-bit formats with odd
    # K, so is the last byte); forward and input gradient, SIMD and portable code, 1 to 70 rows.
    @pytest.mark.parametrize("spec, ternary, k, n", [
        ("int4:g32", "base3", 100, 24), ("int4:g64:asym", "base3", 577, 37), ("int4:g128", "base3", 130, 17),
        ("nf4:g64:dq", "base3", 200, 33), ("nf4:g64", "base3", 99, 16), ("fp4:g64:dq", "base3", 150, 20),
        ("fp4:g32", "base3", 45, 19), ("ternary:g64", "int2", 161, 35), ("int2:g32:asym", "base3", 70, 18),
    ])
    def test_partial_last_group_forward_and_gradient(self, spec, ternary, k, n):
        pw = _packed(spec, k, n, ternary=ternary)
        dense = np.asarray(pw.dequantize(), np.float64)
        rng = np.random.default_rng(22)
        x = jnp.asarray(rng.standard_normal((70, k)), jnp.float32)
        target = jnp.asarray(rng.standard_normal((70, n)), jnp.float32)

        def loss(x):
            return jnp.sum(self.matmul(x, pw) * target[:x.shape[0]])

        forward, backward = jax.jit(lambda x: self.matmul(x, pw)), jax.jit(jax.grad(loss))
        assert "lowbit_packed_matmul_transposed" in backward.lower(x[:2]).as_text()
        for m in (1, 3, 8, 70):
            assert _relative_error(forward(x[:m]), np.asarray(x[:m], np.float64) @ dense) < 1e-5, (spec, m)
            want = np.asarray(target[:m], np.float64) @ dense.T
            assert _relative_error(backward(x[:m]), want) < self.float32_tolerance, (spec, m)
        with portable_code_only():
            assert _relative_error(self.matmul(x[:5], pw), np.asarray(x[:5], np.float64) @ dense) < 1e-5
            assert _relative_error(jax.grad(loss)(x[:5]), np.asarray(target[:5], np.float64) @ dense.T) < 1e-5

    # The blocked GEMM (from NATIVE_GEMM_ROWS rows) against the GEMV and the float64 reference: N
    # with a partial 16-column strip and a partial 64-column panel, K over several 256-row panels
    # (with a partial group), row counts that leave 1-5 rows after the 6-row tiles.
    @pytest.mark.parametrize("spec, ternary, k, n", [
        ("int4:g64:asym", "base3", 600, 83), ("nf4:g64:dq", "base3", 576, 70), ("ternary:g64", "int2", 300, 129),
        ("int2:g32", "base3", 96, 16), ("binary:channel", "base3", 520, 33), ("fp4:g64", "base3", 257, 8),
    ])
    def test_gemm_equals_gemv_and_reference(self, spec, ternary, k, n):
        from lowbit.kernels.packed_matmul.native import packed_matmul_native
        from lowbit.kernels.packed_matmul.reference import float_scales

        pw = _packed(spec, k, n, ternary=ternary)
        fmt, plain = weight_format(pw), float_scales(pw)
        dense = np.asarray(pw.dequantize(), np.float64)
        x = jnp.asarray(np.random.default_rng(23).standard_normal((31, k)), jnp.float32)
        gemm = jax.jit(lambda x: packed_matmul_native(x, plain, fmt, gemm_rows=1))
        gemv = jax.jit(lambda x: packed_matmul_native(x, plain, fmt, gemm_rows=1 << 30))
        for m in (1, 5, 6, 7, 13, 31):
            want = np.asarray(x[:m], np.float64) @ dense
            assert _relative_error(gemm(x[:m]), want) < 1e-5, (spec, m)
            assert _relative_error(gemm(x[:m]), np.asarray(gemv(x[:m]), np.float64)) < 1e-5, (spec, m)
        with portable_code_only():
            assert _relative_error(gemm(x[:7] + 0.0), np.asarray(x[:7], np.float64) @ dense) < 1e-5

    def test_gemm_two_threads_at_once(self):
        """Two Python threads running the GEMM forward and backward together get their own answers."""
        pws = [_packed("nf4:g64:dq", 576, 200), _packed("int4:g32:asym", 200, 576)]
        rng = np.random.default_rng(24)
        xs = [jnp.asarray(rng.standard_normal((48, pw.shape[0])), jnp.float32) for pw in pws]
        step = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(packed_matmul(x, w, impl="native")))))
        expected = [step(x, pw) for x, pw in zip(xs, pws)]
        results = run_concurrently([lambda i=i: step(xs[i], pws[i]) for i in range(2)], 10)
        for i in range(2):
            for value, grad in results[i]:  # same program, same inputs: bit-identical
                assert float(value) == float(expected[i][0])
                assert np.array_equal(np.asarray(grad), np.asarray(expected[i][1]))

    def test_nf4_gradient_forms_no_float_weight(self):
        """Forward and backward of an NF4 double-quantized weight call the two kernels, and the
        compiled program holds no float [K, N] matrix (its temporaries are below one)."""
        k, n, m = 512, 384, 64
        pw = _packed("nf4:g64:dq", k, n)
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(self.matmul(x, w) ** 2)))
        lowered = grad.lower(jnp.ones((m, k), jnp.float32), pw)
        text = lowered.as_text()
        assert "lowbit_packed_matmul_transposed" in text and f"tensor<{k}x{n}xf32>" not in text
        temp = lowered.compile().memory_analysis().temp_size_in_bytes
        assert temp < k * n * 4 / 2, temp  # activations and per-group scales only

    def test_lora_over_a_packed_base_trains_at_decode_rows(self):
        """LoRA on a packed int4 base differentiates through the native kernel (<= 32 rows): its
        adapter gradients equal those over the dequantized float base."""
        from flax import nnx

        from lowbit.nn.lora import LoRA
        from lowbit.nn.packed_layer import packed_layer

        k, n, rank = 128, 48, 4
        rngs = nnx.Rngs(0)
        w = jnp.asarray(np.random.default_rng(17).standard_normal((k, n)), jnp.float32)
        base = nnx.Linear(k, n, use_bias=False, rngs=rngs)
        base.kernel.set_value(w)
        packed = packed_layer(base, quantize(w, QuantSpec.parse("int4:g32"), axis=0), impl="native")
        float_base = nnx.Linear(k, n, use_bias=False, rngs=rngs)
        float_base.kernel.set_value(packed.dequantized_matrix())
        b = jnp.asarray(np.random.default_rng(18).standard_normal((rank, n)), jnp.float32)
        a = jnp.asarray(np.random.default_rng(19).standard_normal((k, rank)), jnp.float32) / k
        x = jnp.asarray(np.random.default_rng(20).standard_normal((2, 3, k)), jnp.float32)
        grads = []
        for layer_base in (packed, float_base):
            model = LoRA(layer_base, rank=rank, alpha=8.0, a=a, b=b, rngs=rngs)
            graphdef, trainable, rest = nnx.split(model, nnx.LoRAParam, ...)

            def loss(trainable, rest=rest, graphdef=graphdef):
                return jnp.sum(jnp.sin(nnx.merge(graphdef, trainable, rest)(x) + x[..., :n]))

            grads.append(jax.grad(loss)(trainable))
        for got, want in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
            assert _relative_error(got, np.asarray(want, np.float64)) < 1e-5

    def test_auto_runs_the_native_kernel_for_decode_and_xla_on_the_dequantized_weight_for_prefill(self):
        """"auto" on CPU: the native kernel (GEMV, from NATIVE_GEMM_ROWS the blocked GEMM) up to
        NATIVE_MAX_ROWS rows of x; above, the native dequantization and XLA's dot forward, the
        transposed kernel on the packed bytes backward."""
        pw = _packed("int4:g64", 128, 32)
        lower = jax.jit(lambda x, w: packed_matmul(x, w)).lower
        for m in (1, NATIVE_GEMM_ROWS, NATIVE_MAX_ROWS):
            text = lower(jnp.ones((m, 128)), pw).as_text()
            assert "@lowbit_packed_matmul(" in text and "@lowbit_packed_dequantize(" not in text, m
        for m in (NATIVE_MAX_ROWS + 1, 512):
            text = lower(jnp.ones((m, 128)), pw).as_text()
            assert "@lowbit_packed_dequantize(" in text and "@lowbit_packed_matmul(" not in text, m
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(packed_matmul(x, w) ** 2)))
        assert "lowbit_packed_matmul_transposed" in grad.lower(jnp.ones((64, 128)), pw).as_text()

    # partial last byte and group, asym, ternary, binary, code books with double-quantized scales
    @pytest.mark.parametrize("spec, ternary, k, n", [
        ("int4:g64", "base3", 576, 70), ("int4:g32:asym", "base3", 201, 40), ("ternary:g64", "int2", 300, 129),
        ("int2:channel:asym", "base3", 190, 21), ("binary:g64", "base3", 128, 19), ("nf4:g64:dq", "base3", 320, 37),
    ])
    def test_prefill_dequantization_equals_the_reference(self, spec, ternary, k, n):
        """The native dequantization gives the XLA reference's weight bit for bit, and "auto" above
        NATIVE_MAX_ROWS rows gives the float64 product and its input gradient within float rounding."""
        from lowbit.kernels.packed_matmul.native import _dequantize, _stat, activation_block
        from lowbit.kernels.packed_matmul.reference import float_scales

        pw = _packed(spec, k, n, ternary=ternary)
        fmt, plain = weight_format(pw), float_scales(pw)
        group_size, _ = activation_block(fmt, plain.data.shape[0] * fmt.fields)
        groups = -(-plain.data.shape[0] * fmt.fields // group_size)
        zero = _stat(plain.zero, groups, n) if fmt.asymmetric else jnp.zeros((1, 1), jnp.float32)
        native = jax.jit(_dequantize, static_argnums=(3, 4, 5))(
            plain.data, _stat(plain.scale, groups, n), zero, fmt, group_size, k)
        np.testing.assert_array_equal(np.asarray(native), np.asarray(jax.jit(lambda w: w.dequantize())(plain)))
        dense = np.asarray(pw.dequantize(), np.float64)
        rng = np.random.default_rng(31)
        x = jnp.asarray(rng.standard_normal((NATIVE_MAX_ROWS + 5, k)), jnp.float32)
        target = rng.standard_normal((NATIVE_MAX_ROWS + 5, n))

        def forward_and_input_gradient(x, w):
            return packed_matmul(x, w), jax.grad(lambda x: jnp.sum(packed_matmul(x, w) * target))(x)

        y, x_bar = jax.jit(forward_and_input_gradient)(x, pw)
        assert _relative_error(y, np.asarray(x, np.float64) @ dense) < 1e-5
        assert _relative_error(x_bar, target @ dense.T) < 1e-5


def _pads_of_shape(fn, args, shape):
    """The pad equations of fn's jaxpr whose operand has `shape` (a padded copy of that array)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "pad" and tuple(eqn.invars[0].aval.shape) == tuple(shape):
                found.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("spec, k, n", [("int4:g64", 576, 576), ("int4:g32:asym", 1536, 576),
                                        ("int4:g64", 576, 192), ("int2:g64", 576, 1536)])
@pytest.mark.parametrize("m", [1, 64])
def test_pallas_passes_smollm2_weights_unpadded(spec, k, n, m):
    """SmolLM2's K (576, 1536) and N take tiles that divide them: no per-call copy of the weight."""
    pw = _packed(spec, k, n)
    fmt = weight_format(pw)
    plan = plan_tiles(m, k, n, fmt, DECODE_CONFIG if m <= 16 else PREFILL_CONFIG, interpret=False)
    assert plan.k_padded == k and plan.n_padded == n
    fn = functools.partial(packed_matmul_pallas, fmt=fmt, plan=plan, interpret=False)
    args = (jnp.ones((m, k), jnp.float32), pw.data, pw.scale, pw.zero)
    assert not _pads_of_shape(fn, args, pw.data.shape)
    assert not _pads_of_shape(fn, args, pw.scale.shape)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
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
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("native", None)  # an op without a native kernel
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


# ---------------------------------------------------------------------------------------------
# activations="int8": x rounded per row and block to int8, integer dots of the codes, then the scales.

@functools.lru_cache(maxsize=None)
def _quantized(spec, k, n, ternary="int2", seed=0):
    """(packed weight, integer codes [k, n] int64, scale [groups, n] f64, zero [groups, n] f64 or None)."""
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32))
    q = quantize(w, QuantSpec.parse(spec))  # codes as integers, the packed weight made from them
    zero = None if q.zero is None else np.asarray(q.zero, np.float64)
    return (pack(q, ternary=ternary), np.asarray(q.codes).astype(np.int64), np.asarray(q.scale, np.float64), zero)


def _block_of(group, fields):
    """The activation block the spec names: the group when it has at most 256 inputs, else its largest
    divisor not above 256 that is a whole number of packed bytes."""
    return max(d for d in range(fields, min(group, 256) + 1, fields) if group % d == 0)


def _int8_reference(x, spec, k, n):
    """numpy restatement of activations="int8": per row and block d = max|x| / 127 and xq = round(x * (1/d))
    in float32 (ties to even, clamped to +-127); exact int64 block dots with the codes; then
    y = sum_g scale[g] sum_{b in g} d_b dot_b + zero[g] sum_{b in g} d_b sum(xq_b), in float64.
    Returns (y, the rounded x d * xq [M, K])."""
    _, codes, scale, zero = _quantized(spec, k, n)
    parsed = QuantSpec.parse(spec)
    fields = 8 // (2 if parsed.kind == "ternary" else parsed.bits)
    group = parsed.group_size if parsed.granularity == "group" else -(-k // fields) * fields
    block, groups = _block_of(group, fields), -(-k // group)
    m, kp = x.shape[0], groups * group
    xb = np.zeros((m, kp), np.float32)
    xb[:, :k] = x
    xb = xb.reshape(m, kp // block, block)
    d = (np.abs(xb).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inverse = np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    xq = np.clip(np.rint(xb * inverse), -127, 127).astype(np.int64)
    codes_padded = np.zeros((kp, n), np.int64)
    codes_padded[:k] = codes
    dots = np.einsum("mbj,bjn->mbn", xq, codes_padded.reshape(kp // block, block, n))  # exact integers
    per_group = (d.astype(np.float64) * dots).reshape(m, groups, group // block, n).sum(2)
    scale = np.broadcast_to(scale, (groups, n))
    y = np.einsum("mgn,gn->mn", per_group, scale)
    if zero is not None:
        xhat_sums = (d[..., 0].astype(np.float64) * xq.sum(-1)).reshape(m, groups, group // block).sum(-1)
        y += xhat_sums @ np.broadcast_to(zero, (groups, n))
    return y, (d * xq).reshape(m, kp)[:, :k].astype(np.float64)


# Integer codes: int4/int2 sym and asym, group/channel scales, ternary and binary; K with partial last
# groups (200 = 3 * 64 + 8, 577 odd), N with a tail of < 32 columns.
INT8_CASES = [
    ("int4:g64", 200, 37),
    ("int4:g64:asym", 576, 70),
    ("int4:g32", 96, 64),
    ("int4:g32:asym", 130, 33),
    ("int4:g128", 256, 40),
    ("int4:channel", 577, 35),
    ("int2:g32:asym", 100, 45),
    ("ternary:g64", 190, 50),
    ("binary:g64", 136, 40),
]


class TestInt8ActivationsNative(NativeImpl):
    @pytest.mark.parametrize("spec, k, n", INT8_CASES)
    def test_equals_numpy_reference_over_batches(self, spec, k, n):
        pw = _quantized(spec, k, n)[0]
        x = np.random.default_rng(21).standard_normal((33, k)).astype(np.float32)
        x[3, : k // 2] = 0.0  # an all-zero block (d = 0)
        expected, _ = _int8_reference(x, spec, k, n)
        sizes = range(1, 34) if spec == "int4:g64" else (1, 2, 3, 4, 5, 8, 24, 33)
        for m in sizes:
            y = packed_matmul(jnp.asarray(x[:m]), pw, impl="native", activations="int8")
            assert _relative_error(y, expected[:m]) < 2e-6, (spec, m)
        with portable_code_only():
            y = packed_matmul(jnp.asarray(x[:5]), pw, impl="native", activations="int8")
        assert _relative_error(y, expected[:5]) < 2e-6, spec

    @pytest.mark.parametrize("spec, k, n", INT8_CASES)
    def test_vnni_code_equals_the_avx2_code(self, spec, k, n):
        """The AVX-512 VNNI GEMV (int4 / int2 / ternary; binary stays on AVX2) gives the AVX2 kernel's y
        bit for bit: the same integer dots, the same float steps (blocks of an odd number of 4-bit rows
        included: int4:channel at K = 577 rounds x in blocks of 34)."""
        from lowbit.kernels.native import simd_at_most, simd_level

        if simd_level() < 2:
            pytest.skip("this CPU has no AVX-512 VNNI")
        pw = _quantized(spec, k, n)[0]
        x = jnp.asarray(np.random.default_rng(26).standard_normal((33, k)), jnp.float32)
        product = jax.jit(lambda x: packed_matmul(x, pw, impl="native", activations="int8"))
        for m in (1, 2, 3, 8, 33):
            vnni = np.asarray(product(x[:m]))
            with simd_at_most(1):
                avx2 = np.asarray(product(x[:m]))
            np.testing.assert_array_equal(vnni, avx2, err_msg=f"{spec} m={m}")

    @pytest.mark.parametrize("spec, k, n", INT8_CASES[:2] + INT8_CASES[7:8])
    def test_xla_rounds_the_same_way(self, spec, k, n):
        pw = _quantized(spec, k, n)[0]
        x = np.random.default_rng(22).standard_normal((3, k)).astype(np.float32)
        y = packed_matmul(jnp.asarray(x), pw, impl="xla", activations="int8")
        assert _relative_error(y, _int8_reference(x, spec, k, n)[0]) < 2e-6

    @pytest.mark.parametrize("spec, k, n", [("int4:g64", 576, 96), ("int4:g32:asym", 200, 37),
                                            ("ternary:g64", 190, 50)])
    def test_error_against_f32_is_bounded_by_the_rounding_of_x(self, spec, k, n):
        """|y8 - y32| = |(xhat - x) W| <= sum_k |xhat_k - x_k| |W_kn| <= sum_b (d_b / 2) sum_{k in b} |W_kn|:
        round to nearest moves each x by at most half its block's step d_b (|x| / d_b <= 127, so no
        clamping), plus float32 rounding of the two products."""
        pw = _quantized(spec, k, n)[0]
        x = np.random.default_rng(23).standard_normal((4, k)).astype(np.float32) * np.linspace(0.1, 3, k, dtype=np.float32)
        y8 = np.asarray(packed_matmul(jnp.asarray(x), pw, impl="native", activations="int8"), np.float64)
        y32 = np.asarray(packed_matmul(jnp.asarray(x), pw, impl="native"), np.float64)
        _, xhat = _int8_reference(x, spec, k, n)
        w = np.abs(np.asarray(pw.dequantize(), np.float64))
        parsed = QuantSpec.parse(spec)
        fields = 8 // (2 if parsed.kind == "ternary" else parsed.bits)
        block = _block_of(parsed.group_size, fields)
        kp = -(-k // parsed.group_size) * parsed.group_size
        xpad = np.zeros((4, kp))
        xpad[:, :k] = x
        half_steps = np.repeat(np.abs(xpad.reshape(4, kp // block, block)).max(-1) / 127 / 2, block, axis=1)[:, :k]
        assert np.all(np.abs(xhat - x) <= half_steps * (1 + 1e-6))
        float_slack = 1e-5 * np.abs(y32).max()
        assert np.all(np.abs(y8 - y32) <= np.abs(xhat - x) @ w + float_slack)
        assert np.all(np.abs(y8 - y32) <= half_steps @ w + float_slack)
        assert np.abs(y8 - y32).max() > 10 * float_slack  # the rounding is real, well above float noise

    @pytest.mark.parametrize("spec, k, n", [("int4:g64", 200, 37), ("ternary:g64", 190, 50)])
    def test_auto_is_int8_in_the_gemv_and_f32_in_the_gemm(self, spec, k, n):
        """activations="auto": exactly the int8 product below NATIVE_GEMM_ROWS rows of x and exactly the
        f32 product from there on; a code book (nf4) takes f32 at every size instead of an error."""
        from lowbit.kernels.dispatch import NATIVE_GEMM_ROWS

        pw = _quantized(spec, k, n)[0]
        x = jnp.asarray(np.random.default_rng(29).standard_normal((NATIVE_GEMM_ROWS + 8, k)), jnp.float32)
        for m in (1, 3, NATIVE_GEMM_ROWS - 1, NATIVE_GEMM_ROWS, NATIVE_GEMM_ROWS + 8):
            auto = np.asarray(packed_matmul(x[:m], pw, impl="native", activations="auto"))
            chosen = "int8" if m < NATIVE_GEMM_ROWS else "f32"
            np.testing.assert_array_equal(auto, np.asarray(packed_matmul(x[:m], pw, impl="native",
                                                                         activations=chosen)), err_msg=str(m))
        xla = packed_matmul(x[:2], pw, impl="xla", activations="auto")  # off the native impl: f32
        np.testing.assert_array_equal(np.asarray(xla), np.asarray(packed_matmul(x[:2], pw, impl="xla")))
        nf4 = _packed("nf4:g64", 128, 32)
        x4 = x[:2, :128]
        np.testing.assert_array_equal(np.asarray(packed_matmul(x4, nf4, impl="native", activations="auto")),
                                      np.asarray(packed_matmul(x4, nf4, impl="native")))

    def test_bad_activations_and_code_books(self):
        pw = _quantized("int4:g64", 128, 32)[0]
        x = jnp.ones((1, 128), jnp.float32)
        for impl in ("native", "xla"):
            with pytest.raises(ValueError, match="activations must be one of"):
                packed_matmul(x, pw, impl=impl, activations="int4")
        nf4 = _packed("nf4:g64", 128, 32)
        with pytest.raises(ValueError, match="integer codes"):
            packed_matmul(x, nf4, impl="native", activations="int8")

    def test_gradient_is_the_f32_input_gradient(self):
        """The rounding of x passes the gradient straight through: d/dx equals the f32 path's."""
        pw = _quantized("int4:g32:asym", 130, 33)[0]
        x = jnp.asarray(np.random.default_rng(24).standard_normal((2, 130)), jnp.float32)
        c = jnp.asarray(np.random.default_rng(26).standard_normal((2, 33)), jnp.float32)
        for impl in ("native", "xla"):
            g8 = jax.grad(lambda x: jnp.sum(c * packed_matmul(x, pw, impl=impl, activations="int8")))(x)
            g32 = jax.grad(lambda x: jnp.sum(c * packed_matmul(x, pw, impl=impl)))(x)
            np.testing.assert_allclose(np.asarray(g8), np.asarray(g32), rtol=1e-5, atol=1e-5)

    def test_two_threads_at_once(self):
        specs = [("int4:g64", 1536, 576), ("ternary:g64", 576, 1536)]
        fn = jax.jit(lambda x, w: packed_matmul(x, w, impl="native", activations="int8"))
        xs = [np.random.default_rng(25 + i).standard_normal((2, k)).astype(np.float32) for i, (_, k, _) in enumerate(specs)]
        pws = [_quantized(*s)[0] for s in specs]
        results = run_concurrently([lambda i=i: np.asarray(fn(jnp.asarray(xs[i]), pws[i])) for i in range(2)], 20)
        for i, spec in enumerate(specs):
            expected, _ = _int8_reference(xs[i], *spec)
            assert all(_relative_error(y, expected) < 2e-6 for y in results[i])

    def test_packed_layer_opts_in(self):
        """PackedLayer.activations = "int8" runs the layer's matmul with int8 activations (the setting is
        a runtime one: f32 by default)."""
        from flax import nnx

        from lowbit.nn.packed_layer import packed_layer

        k, n = 130, 33
        w = jnp.asarray(np.random.default_rng(27).standard_normal((k, n)), jnp.float32)
        base = nnx.Linear(k, n, use_bias=False, rngs=nnx.Rngs(0))
        base.kernel.set_value(w)
        layer = packed_layer(base, quantize(w, QuantSpec.parse("int4:g32:asym"), axis=0), impl="native")
        x = jnp.asarray(np.random.default_rng(28).standard_normal((3, k)), jnp.float32)
        pw = layer.packed.expand_scales()
        assert layer.activations == "f32"
        np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(packed_matmul(x, pw, impl="native")))
        layer.activations = "int8"
        np.testing.assert_array_equal(np.asarray(layer(x)),
                                      np.asarray(packed_matmul(x, pw, impl="native", activations="int8")))
