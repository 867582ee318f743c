"""int8_matmul (W8A8): every implementation against exact int64 numpy products, plus bad input."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from base import KernelTestBase, NativeImpl, PallasImpl, XlaImpl, run_concurrently

from lowbit.kernels.int8_matmul import Int8MatmulConfig, int8_matmul, int8_matmul_reference
from lowbit.kernels.int8_matmul.pallas import DECODE_CONFIG, PREFILL_CONFIG, int8_matmul_pallas, plan_tiles
from lowbit.kernels.native import portable_code_only


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    xs = rng.uniform(0.001, 0.1, (m, 1)).astype(np.float32)
    ws = rng.uniform(0.001, 0.1, (1, n)).astype(np.float32)
    return x, xs, w, ws


def _expected(x, xs, w, ws):
    exact = x.astype(np.int64) @ w.astype(np.int64)
    return exact.astype(np.float64) * np.asarray(xs, np.float64) * np.asarray(ws, np.float64)


class Int8MatmulBase(KernelTestBase):
    def matmul(self, *args, **kwargs):
        return int8_matmul(*args, impl=self.impl, interpret=self.interpret, **kwargs)

    @pytest.mark.parametrize("m, k, n", [(1, 64, 32), (5, 300, 70), (70, 200, 130)])
    def test_matches_exact_product(self, m, k, n):
        x, xs, w, ws = _operands(m, k, n)
        y = self.matmul(jnp.asarray(x), jnp.asarray(xs), jnp.asarray(w), jnp.asarray(ws))
        assert y.dtype == jnp.float32 and y.shape == (m, n)
        np.testing.assert_allclose(np.asarray(y), _expected(x, xs, w, ws), rtol=1e-6, atol=1e-6)

    def test_int32_accumulation_is_exact_at_extremes(self):
        k = 2048  # 2048 * 128 * 128 = 2**25: exact in int32, not in a float32 running sum of products
        x = np.full((3, k), -128, np.int8)
        x[1] = 127
        x[2, ::2] = 127
        w = np.full((k, 20), -128, np.int8)
        w[:, 3] = 127
        y = self.matmul(jnp.asarray(x), jnp.ones((3, 1)), jnp.asarray(w), jnp.ones((1, 20)))
        np.testing.assert_array_equal(np.asarray(y), (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float32))

    def test_out_dtype_scalar_scale_and_leading_dims(self):
        x, xs, w, _ = _operands(6, 96, 40, seed=1)
        x3, xs3 = x.reshape(2, 3, 96), xs.reshape(2, 3, 1)
        y = self.matmul(jnp.asarray(x3), jnp.asarray(xs3), jnp.asarray(w), 0.02, out_dtype=jnp.bfloat16)
        assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 40)
        expected = _expected(x, xs, w, np.float32(0.02)).reshape(2, 3, 40)
        np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())

    def test_bad_inputs(self):
        x, xs, w, ws = (jnp.asarray(a) for a in _operands(2, 64, 16))
        with pytest.raises(ValueError, match="x_codes must have dtype int8"):
            self.matmul(x.astype(jnp.float32), xs, w, ws)
        with pytest.raises(ValueError, match="w_codes must have dtype int8"):
            self.matmul(x, xs, w.astype(jnp.int32), ws)
        with pytest.raises(ValueError, match="x_codes must have shape"):
            self.matmul(x[:, :32], xs, w, ws)
        with pytest.raises(ValueError, match="w_scale must have one of the shapes"):
            self.matmul(x, xs, w, ws[:, :8])
        with pytest.raises(ValueError, match="x_scale must have one of the shapes"):
            self.matmul(x, xs[:1], w, ws)
        with pytest.raises(ValueError, match="out_dtype"):
            self.matmul(x, xs, w, ws, out_dtype=jnp.int32)
        with pytest.raises(ValueError, match="impl must be one of"):
            int8_matmul(x, xs, w, ws, impl="cuda")


class TestInt8MatmulXla(Int8MatmulBase, XlaImpl):
    pass


class TestInt8MatmulNative(Int8MatmulBase, NativeImpl):
    def _reference(self, x, xs, w, ws):
        return np.asarray(int8_matmul(*(jnp.asarray(a) for a in (x, xs, w, ws)), impl="xla"))

    @pytest.mark.parametrize("k, n", [(1, 1), (31, 17), (576, 192), (1537, 40), (64, 16)])
    def test_bit_equal_to_xla_reference_over_batches(self, k, n):
        """Integer sums are exact and the rescale is the reference's, so the floats are the same bits."""
        for m in (1, 2, 3, 4, 7, 16, 64):
            x, xs, w, ws = _operands(m, k, n, seed=m)
            y = np.asarray(self.matmul(*(jnp.asarray(a) for a in (x, xs, w, ws))))
            np.testing.assert_array_equal(y, self._reference(x, xs, w, ws))

    def test_portable_code_is_bit_equal(self):
        x, xs, w, ws = _operands(5, 301, 37, seed=3)
        with portable_code_only():
            y = np.asarray(self.matmul(*(jnp.asarray(a) for a in (x, xs, w, ws))))
        np.testing.assert_array_equal(y, self._reference(x, xs, w, ws))

    def test_two_threads_at_once(self):
        operands = [_operands(3, 1536, 576, seed=4), _operands(2, 576, 1536, seed=5)]
        fn = jax.jit(lambda *a: int8_matmul(*a, impl="native"))
        results = run_concurrently([lambda i=i: np.asarray(fn(*(jnp.asarray(a) for a in operands[i])))
                                    for i in range(2)], 20)
        for i in range(2):
            expected = self._reference(*operands[i])
            assert all(np.array_equal(y, expected) for y in results[i])


class TestInt8MatmulPallas(Int8MatmulBase, PallasImpl):

    def test_explicit_split_k(self):
        x, xs, w, ws = _operands(3, 512, 48, seed=2)
        y = self.matmul(jnp.asarray(x), jnp.asarray(xs), jnp.asarray(w), jnp.asarray(ws),
                        config=Int8MatmulConfig(block_m=16, block_n=16, block_k=64, split_k=4))
        np.testing.assert_allclose(np.asarray(y), _expected(x, xs, w, ws), rtol=1e-6, atol=1e-6)

    def test_lowers_to_triton(self):
        plan = plan_tiles(100, 1000, 300, PREFILL_CONFIG)
        fn = jax.jit(lambda a, b, c, d: int8_matmul_pallas(a, b, c, d, plan=plan, out_dtype=jnp.bfloat16,
                                                           interpret=False))
        args = [jax.ShapeDtypeStruct(s, t) for s, t in
                [((100, 1000), jnp.int8), ((100, 1), jnp.float32), ((1000, 300), jnp.int8), ((1, 300), jnp.float32)]]
        assert "xla.gpu.triton" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_reference_uses_int32_accumulation():
    x, xs, w, ws = (jnp.asarray(a) for a in _operands(2, 64, 8))
    text = jax.jit(int8_matmul_reference).lower(x, xs, w, ws).as_text()
    assert re.search(r"dot_general .*\(tensor<2x64xi8>, tensor<64x8xi8>\) -> tensor<2x8xi32>", text)


def test_config_validation():
    with pytest.raises(ValueError, match="block_k must be >= 32"):
        Int8MatmulConfig(block_m=16, block_n=16, block_k=16)


@pytest.mark.parametrize("k, n", [(576, 576), (576, 192), (1536, 576), (576, 1536)])
def test_pallas_passes_smollm2_weights_unpadded(k, n):
    """Tiles divide SmolLM2's K and N, so no padded copy of w_codes is made inside the call."""
    plan = plan_tiles(1, k, n, DECODE_CONFIG)
    assert plan.k_padded == k and plan.n_padded == n
    fn = functools.partial(int8_matmul_pallas, plan=plan, out_dtype=jnp.float32, interpret=False)
    args = [jax.ShapeDtypeStruct(s, t) for s, t in
            [((1, k), jnp.int8), ((1, 1), jnp.float32), ((k, n), jnp.int8), ((1, n), jnp.float32)]]
    jaxpr = jax.make_jaxpr(fn)(*args)
    assert all(not (e.primitive.name == "pad" and tuple(e.invars[0].aval.shape) == (k, n)) for e in jaxpr.eqns)
    assert "xla.gpu.triton" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
