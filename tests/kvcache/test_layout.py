"""KV layouts: parsing, exact bytes per token, and the KIVI quantization layout (keys per channel in
groups of 32 tokens, values per token, the residual window kept exact)."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.kvcache.layout import (
    TensorFormat,
    decode_channels,
    encode_channels,
    encode_tokens,
    parse_layout,
    round_trip,
    running_group_round_trip,
)
from lowbit.kvcache.policy import H2OPolicy, WindowPolicy, parse_policy

N_KV, HEAD_DIM = 3, 64  # SmolLM2-135M


@pytest.mark.parametrize("name, expected", [
    ("f32", 2 * 3 * 64 * 4),             # 1536
    ("bf16", 2 * 3 * 64 * 2),            # 768
    ("int8", 2 * 3 * (64 + 4)),          # codes + an f16 scale per token, head and 32 channels
    ("int8:g0", 2 * 3 * (64 + 2)),       # one scale per token and head
    ("int4", 2 * 3 * (32 + 2 * 2 * 2)),  # 2 groups of 32 channels, f16 scale + zero each
    ("int2", 2 * 3 * (16 + 2 * 2 * 2)),
    ("kivi2", 3 * (16 + 64 * 4 / 32) + 3 * (16 + 2 * 4)),  # K: per-channel stats over 32 tokens
    ("kivi4", 3 * (32 + 64 * 4 / 32) + 3 * (32 + 2 * 4)),
])
def test_bytes_per_token_are_exact(name, expected):
    assert parse_layout(name).bytes_per_token(N_KV, HEAD_DIM) == expected


def test_kivi_residual_bytes_and_default_page_size():
    layout = parse_layout("kivi2")
    assert layout.key.axis == "channel" and layout.value.axis == "token"
    assert layout.key.residual == 128 and layout.key.group == 32 and not layout.key.symmetric
    assert layout.residual_bytes(N_KV, HEAD_DIM) == 2 * 128 * 3 * 64 * 4
    assert layout.default_page_size() == 32
    assert parse_layout("int8").default_page_size() == 16
    swapped = parse_layout("kivi2:swap")
    assert swapped.key.axis == "token" and swapped.value.axis == "channel"
    assert parse_layout("kivi4:r0").key.ring_length == 32  # the partial group still gathers


@pytest.mark.parametrize("bad", ["int3", "kivi2:r20", "int8:swap", "f32:g32", "kivi2:q", "", "int4:g0:zz"])
def test_bad_layouts_raise_value_error(bad):
    with pytest.raises(ValueError):
        parse_layout(bad)


def test_layout_must_fit_head_and_page():
    with pytest.raises(ValueError, match="page_size"):
        parse_layout("kivi2").check(HEAD_DIM, 16)
    with pytest.raises(ValueError, match="divide head_dim"):
        parse_layout("int4:g24").check(HEAD_DIM, 16)


def test_policies_parse_and_place_tokens():
    policy = parse_policy("sinks:4,window:12")
    assert isinstance(policy, WindowPolicy) and policy.capacity == 16
    assert [policy.slot(p) for p in (0, 3, 15, 16, 27, 28)] == [0, 3, 15, 4, 15, 4]
    assert parse_policy("window:8").slot(13) == 5
    h2o = parse_policy("h2o:0.2").resolve(1000)
    assert isinstance(h2o, H2OPolicy) and (h2o.heavy, h2o.recent) == (100, 100)
    assert parse_policy("heavy:3,recent:5").capacity == 8
    for bad in ("window:0", "sinks:4", "h2o:2", "window:8,heavy:2", "window:-1", "foo:3", "window:8,window:9"):
        with pytest.raises(ValueError):
            parse_policy(bad)


def _keys(seed=0, tokens=64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, N_KV, HEAD_DIM)).astype(np.float32)
    x[:, :, 5] *= 20.0  # an outlier channel, as keys have
    return jnp.asarray(x)


def test_kivi_keys_are_quantized_per_channel_in_groups_of_32_tokens():
    fmt = parse_layout("kivi2").key
    x = _keys()
    codes, scale, zero = encode_channels(x, fmt)
    assert codes.shape == (64, N_KV, HEAD_DIM // 4) and codes.dtype == jnp.uint8  # 2 bits packed
    assert scale.shape == zero.shape == (2, N_KV, HEAD_DIM)  # one (scale, zero) per channel per 32 tokens
    groups = np.asarray(x).reshape(2, 32, N_KV, HEAD_DIM)
    np.testing.assert_allclose(np.asarray(zero, np.float32), groups.min(1), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(scale, np.float32), (groups.max(1) - groups.min(1)) / 3, rtol=1e-3)
    back = decode_channels(codes, scale, zero, fmt, HEAD_DIM)
    error = np.abs(np.asarray(back) - np.asarray(x))
    bound = np.repeat(np.asarray(scale, np.float32), 32, axis=0) / 2 + 1e-2
    assert (error <= bound).all()
    # Per channel, the outlier channel's range does not leak into the others (it would per token).
    assert error[:, :, 5].mean() > 5 * error[:, :, 6].mean()


def test_kivi_values_are_quantized_per_token_in_channel_groups():
    fmt = parse_layout("kivi2").value
    codes, scale, zero = encode_tokens(_keys(), fmt)
    assert scale.shape == (64, N_KV, 2)  # 64 channels / groups of 32
    assert codes.shape == (64, N_KV, 16)


def test_per_channel_keys_beat_per_token_keys_with_an_outlier_channel():
    x = _keys(1)
    per_channel = np.abs(np.asarray(round_trip(x, parse_layout("kivi2").key)) - np.asarray(x)).mean()
    per_token = np.abs(np.asarray(round_trip(x, parse_layout("kivi2:swap").key)) - np.asarray(x)).mean()
    assert per_channel < per_token


def test_running_group_uses_only_real_tokens():
    fmt = TensorFormat(bits=2, axis="channel", group=32, symmetric=False)
    x = _keys(2, 32)
    partial = running_group_round_trip(x, jnp.int32(10), fmt)
    direct = round_trip(jnp.concatenate([x[:10], jnp.repeat(x[:1], 22, axis=0)]), fmt)
    np.testing.assert_array_equal(np.asarray(partial[:10]), np.asarray(direct[:10]))
    alone = round_trip(x[:10].reshape(10, N_KV, HEAD_DIM), TensorFormat(bits=2, axis="channel", group=10,
                                                                         symmetric=False))
    np.testing.assert_allclose(np.asarray(partial[:10]), np.asarray(alone), atol=1e-5)


@pytest.mark.parametrize("name", ["int8", "int4", "int2", "int4:g64:sym"])
def test_per_token_round_trip_error_is_within_half_a_step(name):
    fmt = parse_layout(name).key
    x = _keys(3)
    codes, scale, zero = encode_tokens(x, fmt)
    back = round_trip(x, fmt)
    group = HEAD_DIM // scale.shape[-1]
    step = np.repeat(np.asarray(scale, np.float32), group, axis=-1)
    assert (np.abs(np.asarray(back) - np.asarray(x)) <= step / 2 + 1e-2 * np.abs(np.asarray(x)) + 1e-3).all()


@pytest.mark.parametrize("name", ["int4", "int4:g16:sym", "int8", "int8:g32", "int8:g32:asym"])
def test_cache_and_kernel_share_one_codec(name):
    """What the cache stores, read back by the cache and by the kernel's QuantizedPagePool, is
    the same number (one int4/int8 encoding and decoding)."""
    import jax.numpy as jnp

    from lowbit.kernels.decode_attention import QuantizedPagePool
    from lowbit.kvcache.layout import decode_tokens, encode_tokens

    fmt = parse_layout(name).key
    x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 4, 2, 64)), jnp.float32)
    codes, scale, zero = encode_tokens(x, fmt)
    pool = QuantizedPagePool(codes, scale, zero, f"int{fmt.bits}")
    pool.validate()
    np.testing.assert_array_equal(np.asarray(pool.dequantize()), np.asarray(decode_tokens(codes, scale, zero, fmt, 64)))


def test_default_int4_and_grouped_int8_reach_the_decode_kernel():
    from lowbit.kvcache.policy import parse_policy
    from lowbit.kvcache.store import CacheSpec

    def spec(layout, policy=None):
        return CacheSpec(n_layers=1, n_kv_heads=2, head_dim=64, page_size=32, num_pages=4, slots=1,
                         table_width=4, layout=parse_layout(layout), policy=parse_policy(policy).resolve(128))

    for layout in ("int4", "int4:g32:sym", "int8", "int8:g32", "f32"):
        assert spec(layout).kernel_compatible, layout
    for layout in ("int2", "kivi2", "int4:g32:r16"):
        assert not spec(layout).kernel_compatible, layout
