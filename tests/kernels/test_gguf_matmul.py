"""gguf_matmul: GGUF Q4_0/Q4_1/Q8_0 blocks times activations against the gguf package's dequantization."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from base import KernelTestBase, NativeImpl, XlaImpl, run_concurrently
from gguf import GGMLQuantizationType, quants

from lowbit.kernels import gguf_matmul
from lowbit.kernels.gguf_matmul import dequantize_blocks
from lowbit.kernels.native import portable_code_only

TYPES = ["Q4_0", "Q4_1", "Q8_0"]


def _blocks(ggml_type, n, k, seed=0):
    """A random [n, k] weight quantized by the gguf package: (raw blocks, its float64 dequantization)."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    blocks = quants.quantize(w, GGMLQuantizationType[ggml_type])
    return blocks, quants.dequantize(blocks, GGMLQuantizationType[ggml_type]).astype(np.float64)


def _relative_error(y, expected):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return np.abs(y - expected).max() / max(np.abs(expected).max(), 1e-30)


class GgufMatmulBase(KernelTestBase):
    def matmul(self, x, blocks, ggml_type, **options):
        return gguf_matmul(x, blocks, ggml_type, impl=self.impl, **options)

    @pytest.mark.parametrize("ggml_type", TYPES)
    @pytest.mark.parametrize("n, k", [(1, 32), (37, 96), (16, 576), (50, 1536)])
    def test_equals_gguf_dequantize_times_x(self, ggml_type, n, k):
        blocks, dense = _blocks(ggml_type, n, k)
        rng = np.random.default_rng(1)
        for m in (1, 3, 4, 9, 64):
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = self.matmul(jnp.asarray(x), jnp.asarray(blocks), ggml_type)
            assert y.shape == (m, n) and y.dtype == jnp.float32
            assert _relative_error(y, x.astype(np.float64) @ dense.T) < self.float32_tolerance, (ggml_type, m)

    @pytest.mark.parametrize("ggml_type", TYPES)
    def test_bfloat16_activations_and_leading_dims(self, ggml_type):
        blocks, dense = _blocks(ggml_type, 24, 64, seed=2)
        x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 64)), jnp.bfloat16)
        y = self.matmul(x, jnp.asarray(blocks), ggml_type)
        assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 24)
        expected = np.asarray(x, np.float64).reshape(6, 64) @ dense.T
        assert _relative_error(y.reshape(6, 24), expected) < 2e-2

    @pytest.mark.parametrize("ggml_type", ["Q4_1", "Q8_0"])
    def test_auto_activations_choose_int8_only_for_the_native_gemv(self, ggml_type):
        """activations="auto" is exactly the int8 product on the native impl below NATIVE_GEMM_ROWS rows
        and exactly the f32 product elsewhere (more rows, or the XLA impl)."""
        from lowbit.kernels.dispatch import NATIVE_GEMM_ROWS

        blocks, _ = _blocks(ggml_type, 37, 160, seed=16)
        x = jnp.asarray(np.random.default_rng(17).standard_normal((NATIVE_GEMM_ROWS + 4, 160)), jnp.float32)
        for m in (1, 2, NATIVE_GEMM_ROWS - 1, NATIVE_GEMM_ROWS + 4):
            chosen = "int8" if self.impl == "native" and m < NATIVE_GEMM_ROWS else "f32"
            np.testing.assert_array_equal(
                np.asarray(self.matmul(x[:m], jnp.asarray(blocks), ggml_type, activations="auto")),
                np.asarray(self.matmul(x[:m], jnp.asarray(blocks), ggml_type, activations=chosen)), err_msg=str(m))

    def test_bad_inputs(self):
        blocks, _ = _blocks("Q4_1", 8, 64)
        blocks = jnp.asarray(blocks)
        x = jnp.ones((2, 64), jnp.float32)
        with pytest.raises(ValueError, match="ggml_type must be one of"):
            self.matmul(x, blocks, "Q4_K")
        with pytest.raises(ValueError, match="x must have shape"):
            self.matmul(jnp.ones((2, 96)), blocks, "Q4_1")
        with pytest.raises(ValueError, match="whole 18-byte blocks"):
            self.matmul(x, blocks, "Q4_0")
        with pytest.raises(ValueError, match="blocks must be a uint8 array"):
            self.matmul(x, blocks.astype(jnp.int8), "Q4_1")
        with pytest.raises(ValueError, match="x must be float32"):
            self.matmul(x.astype(jnp.int32), blocks, "Q4_1")
        with pytest.raises(ValueError, match="impl must be one of"):
            gguf_matmul(x, blocks, "Q4_1", impl="pallas")


class TestGgufMatmulXla(GgufMatmulBase, XlaImpl):
    pass


class TestGgufMatmulNative(GgufMatmulBase, NativeImpl):
    @pytest.mark.parametrize("ggml_type", TYPES)
    def test_portable_code(self, ggml_type):
        blocks, dense = _blocks(ggml_type, 21, 160, seed=4)
        x = np.random.default_rng(5).standard_normal((5, 160)).astype(np.float32)
        with portable_code_only():
            y = self.matmul(jnp.asarray(x), jnp.asarray(blocks), ggml_type)
        assert _relative_error(y, x.astype(np.float64) @ dense.T) < self.float32_tolerance

    @pytest.mark.parametrize("ggml_type", TYPES)
    def test_native_dequantize_is_exact_and_serves_prefill(self, ggml_type):
        """The prefill path ("auto" above NATIVE_MAX_ROWS rows) dequantizes natively, bit for bit as
        the gguf package does, then calls XLA's dot."""
        from lowbit.kernels.dispatch import NATIVE_MAX_ROWS
        from lowbit.kernels.gguf_matmul.native import gguf_dequantize_native

        blocks, dense = _blocks(ggml_type, 45, 192, seed=10)
        got = jax.jit(gguf_dequantize_native, static_argnames="ggml_type")(jnp.asarray(blocks), ggml_type)
        np.testing.assert_array_equal(np.asarray(got), dense)
        x = np.random.default_rng(11).standard_normal((NATIVE_MAX_ROWS + 7, 192)).astype(np.float32)
        lowered = jax.jit(lambda x, b: gguf_matmul(x, b, ggml_type)).lower(jnp.asarray(x), jnp.asarray(blocks))
        assert "lowbit_gguf_dequantize" in lowered.as_text()
        y = gguf_matmul(jnp.asarray(x), jnp.asarray(blocks), ggml_type)
        assert _relative_error(y, x.astype(np.float64) @ dense.T) < self.float32_tolerance

    @pytest.mark.parametrize("ggml_type", TYPES)
    def test_int8_activations_match_the_reference_rounding(self, ggml_type):
        """activations="int8": x rounded per row and 32-block as ggml does, integer block dots; equals
        the XLA reference of the same rounding (SIMD and portable code, M up to 64), and differs
        from the f32 product by the rounding of x only."""
        blocks, dense = _blocks(ggml_type, 37, 160, seed=12)
        x = np.random.default_rng(13).standard_normal((64, 160)).astype(np.float32)
        x[1, :32] = 0.0  # an all-zero activation block
        reference = np.asarray(gguf_matmul(jnp.asarray(x), jnp.asarray(blocks), ggml_type, impl="xla",
                                           activations="int8"), np.float64)
        for m in (1, 2, 3, 5, 6, 7, 64):  # the SIMD code's tiles: 1 x 4, 2 x 2, 3 x 2 weight rows, 4 x 1
            y = self.matmul(jnp.asarray(x[:m]), jnp.asarray(blocks), ggml_type, activations="int8")
            assert _relative_error(y, reference[:m]) < 1e-5, (ggml_type, m)
        with portable_code_only():
            y = self.matmul(jnp.asarray(x[:3]), jnp.asarray(blocks), ggml_type, activations="int8")
        assert _relative_error(y, reference[:3]) < 1e-5
        gap = _relative_error(reference, x.astype(np.float64) @ dense.T)
        assert 1e-4 < gap < 1e-2, gap
        with pytest.raises(ValueError, match="activations must be one of"):
            self.matmul(jnp.asarray(x[:1]), jnp.asarray(blocks), ggml_type, activations="int4")

    @pytest.mark.parametrize("ggml_type", TYPES)
    def test_input_gradient_equals_float64(self, ggml_type):
        """x-bar = g @ W over the blocks (the blocked GEMM; no float [N, K] W in the program) equals
        the float64 product with the gguf package's dequantization, for 1 to 40 rows; the forward at
        40 rows (the blocked GEMM) equals x @ W.T; SIMD and portable code."""
        n, k = 83, 160  # a partial 64-column panel of K, a partial 16-column strip of N
        blocks, dense = _blocks(ggml_type, n, k, seed=14)
        rng = np.random.default_rng(15)
        x = jnp.asarray(rng.standard_normal((40, k)), jnp.float32)
        target = rng.standard_normal((40, n))

        def loss(x):
            y = self.matmul(x, jnp.asarray(blocks), ggml_type)
            return jnp.sum(y * jnp.asarray(target[:x.shape[0]], jnp.float32))

        grad = jax.jit(jax.grad(loss))
        text = grad.lower(x[:3]).as_text()
        assert "lowbit_gguf_matmul_transposed" in text and f"tensor<{n}x{k}xf32>" not in text
        for m in (1, 7, 40):
            assert _relative_error(grad(x[:m]), target[:m] @ dense) < self.float32_tolerance, (ggml_type, m)
        y = self.matmul(x, jnp.asarray(blocks), ggml_type)
        assert _relative_error(y, np.asarray(x, np.float64) @ dense.T) < self.float32_tolerance
        with portable_code_only():
            assert _relative_error(jax.grad(loss)(x[:5]), target[:5] @ dense) < self.float32_tolerance
            y = self.matmul(x, jnp.asarray(blocks), ggml_type)
            assert _relative_error(y, np.asarray(x, np.float64) @ dense.T) < self.float32_tolerance

    def test_gemm_and_gradient_two_threads_at_once(self):
        """Two Python threads running the blocked GEMM forward and the gradient together get the same
        bits as when run alone."""
        problems = [(_blocks("Q4_0", 200, 576, seed=16)[0], "Q4_0"), (_blocks("Q8_0", 576, 192, seed=17)[0], "Q8_0")]
        rng = np.random.default_rng(18)
        xs = [jnp.asarray(rng.standard_normal((48, b.shape[1] // (18 if t == "Q4_0" else 34) * 32)), jnp.float32)
              for b, t in problems]
        steps = [jax.jit(jax.value_and_grad(lambda x, b, t=t: jnp.sum(jnp.sin(gguf_matmul(x, b, t, impl="native")))))
                 for _, t in problems]
        expected = [steps[i](xs[i], jnp.asarray(problems[i][0])) for i in range(2)]
        results = run_concurrently([lambda i=i: steps[i](xs[i], jnp.asarray(problems[i][0])) for i in range(2)], 10)
        for i in range(2):
            for value, grad in results[i]:
                assert float(value) == float(expected[i][0])
                assert np.array_equal(np.asarray(grad), np.asarray(expected[i][1]))

    def test_two_threads_at_once_inside_jit(self):
        problems = [_blocks("Q4_1", 576, 1536, seed=6), _blocks("Q8_0", 1536, 576, seed=7)]
        types = ["Q4_1", "Q8_0"]
        fns = [jax.jit(lambda x, b, t=t: gguf_matmul(jax.nn.relu(x), b, t, impl="native")) for t in types]
        xs = [np.random.default_rng(8 + i).standard_normal((2, problems[i][1].shape[1])).astype(np.float32)
              for i in range(2)]
        results = run_concurrently([lambda i=i: fns[i](jnp.asarray(xs[i]), jnp.asarray(problems[i][0]))
                                    for i in range(2)], 10)
        for i in range(2):
            expected = np.maximum(xs[i], 0).astype(np.float64) @ problems[i][1].T
            assert all(_relative_error(y, expected) < self.float32_tolerance for y in results[i])


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_blocks_is_exact(ggml_type):
    blocks, dense = _blocks(ggml_type, 9, 128, seed=9)
    np.testing.assert_array_equal(np.asarray(dequantize_blocks(jnp.asarray(blocks), ggml_type)), dense)


@pytest.mark.model
def test_real_model_tensors(smollm2_path):
    """SmolLM2's own Q4_1 linear and Q8_0 embedding rows, straight from the file."""
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_path)
    tensors = {t.name: t for t in reader.tensors}
    for name, rows in (("blk.0.ffn_down.weight", None), ("token_embd.weight", 512)):
        tensor = tensors[name]
        blocks = np.asarray(tensor.data)[:rows]
        dense = quants.dequantize(blocks, tensor.tensor_type).astype(np.float64)
        x = np.random.default_rng(10).standard_normal((3, dense.shape[1])).astype(np.float32)
        y = gguf_matmul(jnp.asarray(x), jnp.asarray(blocks), tensor.tensor_type.name)
        assert _relative_error(y, x.astype(np.float64) @ dense.T) < 2e-5
