"""decode_attention over paged KV caches (float, int8, int4) against dense numpy softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from base import KernelTestBase, NativeImpl, PallasImpl, XlaImpl, run_concurrently

from lowbit.kernels.decode_attention import (
    DecodeAttentionConfig,
    QuantizedPagePool,
    decode_attention,
    dequantize_page_fields,
    interleave_fields,
    quantize_pages,
)
from lowbit.kernels.decode_attention.pallas import decode_attention_pallas, plan_decode

PAGE_SIZE, MAX_PAGES = 4, 6
LENGTHS = np.array([1, 8, 13, 24], np.int32)  # one token, a page boundary, mid-page, full capacity
SMALL_BLOCKS = DecodeAttentionConfig(block_tokens=16)  # several page blocks even for short tests


def _paged_cache(n_kv, head_dim, seed=0, batch=len(LENGTHS), extra_pages=5):
    """Dense K/V [B, S, n_kv, D] scattered over shuffled pages; table entries past a length are -1."""
    rng = np.random.default_rng(seed)
    seq = MAX_PAGES * PAGE_SIZE
    k = rng.standard_normal((batch, seq, n_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, seq, n_kv, head_dim)).astype(np.float32)
    num_pages = batch * MAX_PAGES + extra_pages
    tables = rng.permutation(num_pages)[: batch * MAX_PAGES].reshape(batch, MAX_PAGES).astype(np.int32)
    k_pages = rng.standard_normal((num_pages, PAGE_SIZE, n_kv, head_dim)).astype(np.float32)  # junk in unused pages
    v_pages = rng.standard_normal((num_pages, PAGE_SIZE, n_kv, head_dim)).astype(np.float32)
    for b in range(batch):
        for j in range(MAX_PAGES):
            k_pages[tables[b, j]] = k[b, j * PAGE_SIZE:(j + 1) * PAGE_SIZE]
            v_pages[tables[b, j]] = v[b, j * PAGE_SIZE:(j + 1) * PAGE_SIZE]
    lengths = LENGTHS[:batch]
    used = np.arange(MAX_PAGES)[None, :] < -(-lengths[:, None] // PAGE_SIZE)
    tables = np.where(used, tables, -1)
    return k_pages, v_pages, tables, lengths


def _dense(pages, tables):
    """Gather pages [P, ps, H, D] through the table into [B, W*ps, H, D] (numpy)."""
    gathered = np.asarray(pages, np.float64)[np.maximum(tables, 0)]
    b, w, ps, h, d = gathered.shape
    return gathered.reshape(b, w * ps, h, d)


def _attention(q, k, v, lengths):
    """Dense softmax attention in float64: q [B, H, D], k/v [B, S, Hkv, D]."""
    q = np.asarray(q, np.float64)
    batch, n_heads, d = q.shape
    group = n_heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(n_heads):
            keys, values = k[b, : lengths[b], h // group], v[b, : lengths[b], h // group]
            s = keys @ q[b, h] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ values
    return out


def _error(out, expected):
    return np.abs(np.asarray(jnp.asarray(out, jnp.float32), np.float64) - expected).max()


class DecodeAttentionBase(KernelTestBase):
    def attend(self, *args, **kwargs):
        return decode_attention(*args, impl=self.impl, interpret=self.interpret, **kwargs)

    def run_case(self, group, n_kv, head_dim, k_kind=None, v_kind=None, symmetric=True, dtype=jnp.float32,
                 config=SMALL_BLOCKS, seed=0):
        k_pages, v_pages, tables, lengths = _paged_cache(n_kv, head_dim, seed=seed)
        q = np.random.default_rng(seed + 1).standard_normal((len(lengths), group * n_kv, head_dim))
        q = jnp.asarray(q, dtype)

        def prepare(pages, kind):
            if kind is None:
                stored = jnp.asarray(pages, dtype)
                return stored, np.asarray(stored.astype(jnp.float32))
            pool = quantize_pages(pages, kind, symmetric=symmetric)
            return pool, np.asarray(pool.dequantize())

        k_stored, k_values = prepare(k_pages, k_kind)
        v_stored, v_values = prepare(v_pages, v_kind)
        out = self.attend(q, k_stored, v_stored, jnp.asarray(tables), jnp.asarray(lengths), config=config)
        assert out.shape == q.shape and out.dtype == q.dtype
        expected = _attention(np.asarray(q.astype(jnp.float32)), _dense(k_values, tables), _dense(v_values, tables),
                              lengths)
        return _error(out, expected)

    @pytest.mark.parametrize("group, dtype, tolerance", [(1, jnp.float32, 1e-5), (3, jnp.bfloat16, 3e-2)])
    def test_float_pages(self, group, dtype, tolerance):
        assert self.run_case(group, n_kv=2, head_dim=32, dtype=dtype) < tolerance

    @pytest.mark.parametrize(
        "k_kind, v_kind, symmetric",
        [("int8", "int8", True), ("int8", "int8", False), ("int4", "int4", True), ("int4", "int4", False),
         ("int8", "int4", True)],
    )
    def test_quantized_pages(self, k_kind, v_kind, symmetric):
        assert self.run_case(4, n_kv=2, head_dim=32, k_kind=k_kind, v_kind=v_kind, symmetric=symmetric) < 1e-5

    @pytest.mark.parametrize(
        "config",
        [DecodeAttentionConfig(block_tokens=16, num_splits=1), DecodeAttentionConfig(block_tokens=16, num_splits=2),
         DecodeAttentionConfig(block_tokens=64)],
    )
    def test_block_and_split_configs(self, config):
        assert self.run_case(2, n_kv=1, head_dim=16, config=config, seed=3) < 1e-5

    def test_under_jit_with_traced_lengths(self):
        k_pages, v_pages, tables, lengths = _paged_cache(1, 16, seed=4)
        q = jnp.asarray(np.random.default_rng(5).standard_normal((len(lengths), 2, 16)), jnp.float32)
        fn = jax.jit(lambda q, k, v, t, n: decode_attention(q, k, v, t, n, impl=self.impl, interpret=self.interpret))
        out = fn(q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables), jnp.asarray(lengths))
        expected = _attention(np.asarray(q), _dense(k_pages, tables), _dense(v_pages, tables), lengths)
        assert _error(out, expected) < 1e-5

    def test_a_layer_of_stacked_pages(self):
        """layer= reads one layer of a cache's stacked storage [L, P, ps, Hkv, D]: the same output as
        that layer's pages alone, whatever the other layers hold."""
        k_pages, v_pages, tables, lengths = _paged_cache(3, 16, seed=14)
        rng = np.random.default_rng(15)
        junk = lambda: rng.standard_normal(k_pages.shape).astype(np.float32)
        k_stack = jnp.asarray(np.stack([junk(), k_pages, junk()]))
        v_stack = jnp.asarray(np.stack([junk(), v_pages, junk()]))
        q = jnp.asarray(rng.standard_normal((len(lengths), 6, 16)), jnp.float32)
        fn = jax.jit(lambda q, k, v, t, n: decode_attention(q, k, v, t, n, impl=self.impl, interpret=self.interpret,
                                                            layer=1))
        out = fn(q, k_stack, v_stack, jnp.asarray(tables), jnp.asarray(lengths))
        expected = _attention(np.asarray(q), _dense(k_pages, tables), _dense(v_pages, tables), lengths)
        assert _error(out, expected) < 1e-5
        with pytest.raises(ValueError, match=r"layer must be an integer in 0..2, got 3"):
            self.attend(q, k_stack, v_stack, jnp.asarray(tables), jnp.asarray(lengths), layer=3)
        with pytest.raises(ValueError, match=r"k_pages with layer= must be \[layers"):
            self.attend(q, k_stack[0], v_stack, jnp.asarray(tables), jnp.asarray(lengths), layer=0)

    def test_smollm2_shapes_over_a_long_context(self):
        """9 query heads over 3 KV heads, head_dim 64, pages of 16, 545 and 77 cached tokens: the
        lengths a decode after a 512-token prompt reads; both sequences, then each alone (the native
        kernel then cuts each KV head's positions into pieces for the threads and merges their
        softmaxes)."""
        rng = np.random.default_rng(16)
        width, ps, pages = 40, 16, 90
        k_pages = rng.standard_normal((pages, ps, 3, 64)).astype(np.float32)
        v_pages = rng.standard_normal((pages, ps, 3, 64)).astype(np.float32)
        tables = rng.permutation(pages)[:2 * width].reshape(2, width).astype(np.int32)
        lengths = np.array([545, 77], np.int32)
        q = jnp.asarray(rng.standard_normal((2, 9, 64)), jnp.float32)
        out = self.attend(q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables), jnp.asarray(lengths))
        expected = _attention(np.asarray(q), _dense(k_pages, tables), _dense(v_pages, tables), lengths)
        assert _error(out, expected) < 1e-5
        for row in range(2):
            alone = self.attend(q[row:row + 1], jnp.asarray(k_pages), jnp.asarray(v_pages),
                                jnp.asarray(tables[row:row + 1]), jnp.asarray(lengths[row:row + 1]))
            assert _error(alone, expected[row:row + 1]) < 1e-5

    def test_bad_inputs(self):
        k_pages, v_pages, tables, lengths = (jnp.asarray(a) for a in _paged_cache(2, 16))
        q = jnp.ones((len(LENGTHS), 4, 16), jnp.float32)
        with pytest.raises(ValueError, match="lengths must lie in 1..24"):
            self.attend(q, k_pages, v_pages, tables, lengths.at[0].set(0))
        with pytest.raises(ValueError, match="lengths must lie in 1..24"):
            self.attend(q, k_pages, v_pages, tables, lengths.at[0].set(25))
        with pytest.raises(ValueError, match="block_tables: 1 entries"):
            self.attend(q, k_pages, v_pages, tables.at[1, 0].set(k_pages.shape[0]), lengths)
        with pytest.raises(ValueError, match="n_heads 3 must be a multiple of n_kv_heads 2"):
            self.attend(jnp.ones((4, 3, 16)), k_pages, v_pages, tables, lengths)
        with pytest.raises(ValueError, match="head_dim"):
            self.attend(jnp.ones((4, 4, 8)), k_pages, v_pages, tables, lengths)
        with pytest.raises(ValueError, match="k_pages and v_pages must have the same"):
            self.attend(q, k_pages, v_pages[:3], tables, lengths)
        with pytest.raises(ValueError, match="block_tables must be"):
            self.attend(q, k_pages, v_pages, tables[:2], lengths)
        with pytest.raises(ValueError, match="lengths must be"):
            self.attend(q, k_pages, v_pages, tables, lengths[:2])
        with pytest.raises(ValueError, match="k_pages must be float pages"):
            self.attend(q, k_pages.astype(jnp.int8), v_pages, tables, lengths)
        with pytest.raises(ValueError, match="softmax_scale"):
            self.attend(q, k_pages, v_pages, tables, lengths, softmax_scale=-1.0)
        bad_pool = QuantizedPagePool(jnp.zeros((30, 4, 2, 16), jnp.uint8), jnp.ones((30, 4, 2, 1)), None, "int8")
        with pytest.raises(ValueError, match="k_pages.codes must have dtype int8"):
            self.attend(q, bad_pool, v_pages, tables, lengths)


class TestDecodeAttentionXla(DecodeAttentionBase, XlaImpl):
    pass


class TestDecodeAttentionNative(DecodeAttentionBase, NativeImpl):
    """The C++ kernel reads float pages (f32, f16, bf16) as they are stored; a quantized pool is refused
    by name (under impl="auto" it runs on XLA)."""

    @pytest.mark.parametrize("k_kind, v_kind, symmetric", [("int8", "int8", True), ("int4", "int4", False)])
    def test_quantized_pages(self, k_kind, v_kind, symmetric):
        with pytest.raises(ValueError, match="impl='native' reads float pages"):
            self.run_case(4, n_kv=2, head_dim=32, k_kind=k_kind, v_kind=v_kind, symmetric=symmetric)
        k_pages, v_pages, tables, lengths = _paged_cache(2, 32)
        q = jnp.asarray(np.random.default_rng(1).standard_normal((len(lengths), 4, 32)), jnp.float32)
        pools = [quantize_pages(p, k_kind) for p in (k_pages, v_pages)]
        auto = decode_attention(q, *pools, jnp.asarray(tables), jnp.asarray(lengths))
        exact = _attention(np.asarray(q), _dense(pools[0].dequantize(), tables), _dense(pools[1].dequantize(), tables),
                           lengths)
        assert _error(auto, exact) < 1e-5

    def test_auto_takes_the_native_kernel_for_float32_pages(self):
        k_pages, v_pages, tables, lengths = (jnp.asarray(a) for a in _paged_cache(2, 16))
        q = jnp.ones((len(LENGTHS), 4, 16), jnp.float32)
        text = jax.jit(lambda q, k, v: decode_attention(q, k, v, tables, lengths)).lower(q, k_pages, v_pages).as_text()
        assert "lowbit_decode_attention" in text
        for dtype in (jnp.float16, jnp.bfloat16):  # read as stored: no conversion of the pool
            half = jax.jit(lambda q, k, v: decode_attention(q, k, v, tables, lengths)).lower(
                q, k_pages.astype(dtype), v_pages.astype(dtype)).as_text()
            assert "lowbit_decode_attention" in half and "convert" not in half.split("lowbit_decode_attention")[0]

    @pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
    def test_half_pages_simd_and_portable(self, dtype):
        """f16/bf16 pages: the AVX2 loads (F16C, a 16-bit shift) and the portable conversions give
        attention over the pages' own values within f32 rounding."""
        from lowbit.kernels.native import portable_code_only

        k_pages, v_pages, tables, lengths = _paged_cache(3, 44, seed=22)
        k_half, v_half = jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype)
        q = jnp.asarray(np.random.default_rng(23).standard_normal((len(lengths), 6, 44)), jnp.float32)
        expected = _attention(np.asarray(q), _dense(np.asarray(k_half.astype(jnp.float32)), tables),
                              _dense(np.asarray(v_half.astype(jnp.float32)), tables), lengths)
        args = (q, k_half, v_half, jnp.asarray(tables), jnp.asarray(lengths))
        simd = self.attend(*args)
        with portable_code_only():
            portable = self.attend(*args)
        assert _error(simd, expected) < 1e-5 and _error(portable, expected) < 1e-5

    def test_portable_code_matches_the_simd_code(self):
        """The scalar path (no AVX2: plain dots, std::exp) and the AVX2 path (grouped dots, a polynomial
        exp) both meet float64 attention, over lengths and a head_dim that are not multiples of 8 and 5
        heads per KV head (one group of four accumulators and one single)."""
        from lowbit.kernels.native import portable_code_only

        k_pages, v_pages, tables, lengths = _paged_cache(2, 36, seed=20)  # head_dim 36: 4 past the lanes of 8
        q = jnp.asarray(np.random.default_rng(21).standard_normal((len(lengths), 10, 36)) * 3, jnp.float32)
        args = (q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables), jnp.asarray(lengths))
        expected = _attention(np.asarray(q), _dense(k_pages, tables), _dense(v_pages, tables), lengths)
        simd = self.attend(*args)
        with portable_code_only():
            portable = self.attend(*args)
        assert _error(simd, expected) < 1e-5 and _error(portable, expected) < 1e-5

    @pytest.mark.parametrize("head_dim, dtype", [(80, jnp.float32), (128, jnp.float16)])
    def test_head_dims_past_one_register_slice(self, head_dim, dtype):
        """The AVX2 path's blocked passes (eight positions' dots reduced together, each head's output
        held in registers 64 values at a time) over a head_dim of 64 + 16 and of 2 x 64, with lengths
        that leave partial blocks of eight, meet float64 attention over the pages' own values."""
        k_pages, v_pages, tables, lengths = _paged_cache(2, head_dim, seed=24)
        k_half, v_half = jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype)
        q = jnp.asarray(np.random.default_rng(25).standard_normal((len(lengths), 6, head_dim)), jnp.float32)
        expected = _attention(np.asarray(q), _dense(np.asarray(k_half.astype(jnp.float32)), tables),
                              _dense(np.asarray(v_half.astype(jnp.float32)), tables), lengths)
        out = self.attend(q, k_half, v_half, jnp.asarray(tables), jnp.asarray(lengths))
        assert _error(out, expected) < 1e-5

    def test_concurrent_calls(self):
        k_pages, v_pages, tables, lengths = _paged_cache(2, 32, seed=17)
        qs = [jnp.asarray(np.random.default_rng(i).standard_normal((len(lengths), 4, 32)), jnp.float32)
              for i in (18, 19)]
        fn = jax.jit(lambda q: decode_attention(q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables),
                                                jnp.asarray(lengths), impl="native"))
        results = run_concurrently([lambda i=i: np.asarray(fn(qs[i])) for i in range(2)], 10)
        for q, outs in zip(qs, results):
            expected = _attention(np.asarray(q), _dense(k_pages, tables), _dense(v_pages, tables), lengths)
            assert all(_error(out, expected) < 1e-5 for out in outs)


class TestDecodeAttentionPallas(DecodeAttentionBase, PallasImpl):

    @pytest.mark.parametrize("kind", [None, "int8", "int4"])
    def test_lowers_to_triton(self, kind):
        """SmolLM2-like shapes (9 heads over 3 kv heads, head_dim 64) lower to Triton IR without a GPU."""
        pages = np.random.default_rng(0).standard_normal((40, 16, 3, 64)).astype(np.float32)
        if kind is None:
            pool = jnp.asarray(pages, jnp.bfloat16)
        else:
            pool = quantize_pages(pages, kind, symmetric=kind == "int8")
        fields = 2 if kind == "int4" else 1
        plan = plan_decode(2, 9, 3, 64, 16, 16, fields, fields, DecodeAttentionConfig(), interpret=False)
        fn = jax.jit(lambda q, k, v, t, n: decode_attention_pallas(q, k, v, t, n, softmax_scale=0.125, plan=plan,
                                                                   interpret=False))
        args = (jax.ShapeDtypeStruct((2, 9, 64), jnp.bfloat16), pool, pool, jax.ShapeDtypeStruct((2, 16), jnp.int32),
                jax.ShapeDtypeStruct((2,), jnp.int32))
        assert "xla.gpu.triton" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_quantization_error_is_small():
    """Attention over int8/int4 pools stays close to attention over the float pages."""
    k_pages, v_pages, tables, lengths = _paged_cache(2, 32, seed=6)
    q = jnp.asarray(np.random.default_rng(7).standard_normal((len(lengths), 4, 32)), jnp.float32)
    exact = _attention(np.asarray(q), _dense(k_pages, tables), _dense(v_pages, tables), lengths)
    for kind, bound in (("int8", 0.02), ("int4", 0.3)):
        out = decode_attention(q, quantize_pages(k_pages, kind), quantize_pages(v_pages, kind), jnp.asarray(tables),
                               jnp.asarray(lengths), impl="xla")
        assert _error(out, exact) < bound, kind


def test_page_pool_layout_and_pytree():
    pages = np.random.default_rng(8).standard_normal((3, 4, 2, 8)).astype(np.float32)
    pool = quantize_pages(pages, "int4")
    assert pool.codes.shape == (3, 4, 2, 4) and pool.codes.dtype == jnp.uint8 and pool.shape == (3, 4, 2, 8)
    assert pool.scale.shape == (3, 4, 2, 1) and pool.zero is None
    assert pool.nbytes == 3 * 4 * 2 * 4 + 3 * 4 * 2 * 2
    codes = np.asarray(pool.codes).astype(np.int32)
    low, high = (codes & 15) - 8, (codes >> 4) - 8  # element 2j in the low nibble, 2j+1 in the high one
    manual = np.stack([low, high], axis=-1).reshape(3, 4, 2, 8) * np.asarray(pool.scale, np.float32)
    np.testing.assert_allclose(np.asarray(pool.dequantize()), manual, rtol=1e-6)
    leaves, treedef = jax.tree_util.tree_flatten(pool)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, QuantizedPagePool) and again.kind == "int4"
    assert len(dequantize_page_fields(pool.codes, pool.scale, pool.zero, pool.kind)) == 2
    asym = quantize_pages(pages, "int8", symmetric=False)
    assert asym.codes.dtype == jnp.uint8 and asym.zero.shape == (3, 4, 2, 1)
    np.testing.assert_allclose(np.asarray(asym.dequantize()), pages, atol=np.abs(pages).max() / 100)


def test_quantize_pages_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        quantize_pages(np.zeros((1, 2, 1, 4)), "int2")
    with pytest.raises(ValueError, match="pages must be"):
        quantize_pages(np.zeros((2, 1, 4)), "int8")
    with pytest.raises(ValueError, match="head_dim, which must be even"):
        quantize_pages(np.zeros((1, 2, 1, 5)), "int4")


def test_dequantize_page_fields_per_channel_scale():
    """A per-channel scale [..., head_dim] (KIVI-style keys) is split into the int4 fields too."""
    pages = np.random.default_rng(9).standard_normal((2, 4, 1, 8)).astype(np.float32)
    pool = quantize_pages(pages, "int4")
    channel_scale = jnp.asarray(np.linspace(0.5, 2.0, 8, dtype=np.float32)).reshape(1, 1, 1, 8)
    fields = dequantize_page_fields(pool.codes, channel_scale, None, "int4")
    codes = np.asarray(pool.codes).astype(np.int32)
    signed = np.stack([(codes & 15) - 8, (codes >> 4) - 8], axis=-1).reshape(2, 4, 1, 8)
    np.testing.assert_allclose(np.asarray(interleave_fields(fields)), signed * np.asarray(channel_scale))


def test_triton_shape_limits():
    with pytest.raises(ValueError, match="power-of-two page_size"):
        plan_decode(1, 4, 2, 64, 12, 8, 1, 1, DecodeAttentionConfig(), interpret=False)
    with pytest.raises(ValueError, match="head_dim / 2 to be a power of two"):
        plan_decode(1, 4, 2, 24, 16, 8, 2, 2, DecodeAttentionConfig(), interpret=False)
    plan = plan_decode(2, 9, 3, 64, 16, 40, 1, 1, DecodeAttentionConfig(), interpret=False)
    assert plan.group_padded == 16 and plan.pages_per_block == 4 and plan.table_width == 40
    assert plan.num_splits * plan.blocks_per_split >= 10


@pytest.mark.parametrize("kind, symmetric", [("int4", False), ("int4", True), ("int8", True)])
def test_grouped_scales_reach_the_pallas_kernel(kind, symmetric):
    """Pools with one scale per group of 16 channels (lowbit.kvcache's default int4 layout is
    groups of 32): the Pallas kernel (interpret) equals dense attention over the dequantized pages."""
    k_pages, v_pages, tables, lengths = _paged_cache(2, 64, seed=11)
    k_pool = quantize_pages(k_pages, kind, symmetric=symmetric, group=16)
    v_pool = quantize_pages(v_pages, kind, symmetric=symmetric, group=16)
    assert k_pool.scale.shape == (*k_pool.codes.shape[:3], 4)
    q = jnp.asarray(np.random.default_rng(12).standard_normal((len(lengths), 4, 64)), jnp.float32)
    expected = _attention(np.asarray(q), _dense(k_pool.dequantize(), tables),
                          _dense(v_pool.dequantize(), tables), lengths)
    for impl in ("pallas", "xla"):
        out = decode_attention(q, k_pool, v_pool, jnp.asarray(tables), jnp.asarray(lengths), impl=impl,
                               interpret=True if impl == "pallas" else None, config=SMALL_BLOCKS)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
    # groups are finer than whole heads: closer to the float pages than one scale per head
    whole = quantize_pages(k_pages, kind, symmetric=symmetric)
    error = lambda pool: np.abs(np.asarray(pool.dequantize()) - k_pages).mean()
    assert error(k_pool) < error(whole)
    with pytest.raises(ValueError, match="group must divide head_dim"):
        quantize_pages(k_pages, kind, group=24)


def test_xla_path_reads_only_the_filled_pages():
    """Under jit the XLA path picks, per step, the smallest bucket of table width that holds the
    longest sequence; the result equals attention over the whole table."""
    from lowbit.kernels.decode_attention.api import filled_pages_only, width_buckets

    assert width_buckets(20) == [8, 16, 20] and width_buckets(8) == [8] and width_buckets(64) == [8, 16, 32, 64]
    rng = np.random.default_rng(13)
    pages, width, ps = 40, 20, 4
    k_pages = rng.standard_normal((pages, ps, 2, 32)).astype(np.float32)
    v_pages = rng.standard_normal((pages, ps, 2, 32)).astype(np.float32)
    tables = rng.permutation(pages)[:2 * width].reshape(2, width).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((2, 4, 32)), jnp.float32)
    step = jax.jit(lambda lengths: decode_attention(q, jnp.asarray(k_pages), jnp.asarray(v_pages),
                                                    jnp.asarray(tables), lengths, impl="xla"))
    seen = []
    for lengths in ([3, 30], [33, 5], [80, 70]):  # buckets of 8, 16 and 20 pages
        lengths = np.array(lengths, np.int32)
        expected = _attention(np.asarray(q), _dense(k_pages, tables), _dense(v_pages, tables), lengths)
        np.testing.assert_allclose(np.asarray(step(jnp.asarray(lengths))), expected, rtol=1e-4, atol=1e-4)
        filled_pages_only(lambda t: seen.append(t.shape[1]), jnp.asarray(tables), lengths, ps)
    assert seen == [8, 16, 20] and step._cache_size() == 1
