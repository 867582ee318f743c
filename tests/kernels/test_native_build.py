"""The native backend's build: cached by content, and a clear warning plus the XLA path when it cannot build."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.kernels import native
from lowbit.kernels.dispatch import resolve_impl
from lowbit.kernels.packed_matmul import packed_matmul


@pytest.fixture
def fresh_native_state():
    """A native-backend state as in a new process; the real one comes back afterwards."""
    saved = dict(native._state)
    native._state.update(tried=False, library=None, error=None)
    yield
    native._state.clear()
    native._state.update(saved)


def test_missing_compiler_warns_once_and_auto_takes_xla(monkeypatch, fresh_native_state):
    monkeypatch.setenv("CXX", "no-such-compiler-for-lowbit")
    with pytest.warns(RuntimeWarning, match=r"native CPU kernels unavailable \(no C\+\+ compiler found"):
        assert native.native_library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no second warning (JAX may warn of other things)
        assert not native.native_available()
        if jax.default_backend() == "cpu":
            assert resolve_impl("auto", None, has_native=True) == ("xla", False)
            with pytest.raises(ValueError, match="impl='native': the native CPU kernels are unavailable"):
                resolve_impl("native", None, has_native=True)
        from lowbit.core.packing import pack
        from lowbit.core.quantize import quantize

        w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8)), jnp.float32)
        pw = pack(quantize(w, "int4:g32"))
        x = jnp.ones((2, 64), jnp.float32)
        np.testing.assert_allclose(np.asarray(packed_matmul(x, pw)), np.asarray(x @ pw.dequantize()), rtol=1e-5,
                                   atol=1e-5)


def test_turned_off_by_environment(monkeypatch, fresh_native_state):
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    assert native.native_library() is None
    assert "LOWBIT_NATIVE=0" in native.native_error()


def test_library_is_cached_by_content():
    if not native.native_available():
        pytest.skip(f"native backend unavailable: {native.native_error()}")
    first = native.build_library()
    assert first.exists() and first.parent == native.cache_dir()
    assert native.build_library() == first  # same source, flags and compiler: no rebuild
    assert native.simd_level() in (0, 1, 2)


def test_simd_level_is_capped_inside_the_block_and_restored_after():
    if not native.native_available():
        pytest.skip(f"native backend unavailable: {native.native_error()}")
    level = native.simd_level()
    for cap in (0, 1, 2):
        with native.simd_at_most(cap):
            assert native.simd_level() == min(cap, level)
    assert native.simd_level() == level
    with native.simd_at_most(1):
        with native.portable_code_only():
            assert native.simd_level() == 0
        assert native.simd_level() == min(1, level)  # the outer cap again, not the top level
    with pytest.raises(ValueError, match="level must be 0, 1 or 2"):
        with native.simd_at_most(3):
            pass
