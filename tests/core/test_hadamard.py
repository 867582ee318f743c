"""Tests of the Hadamard matrices, the randomized rotations and the fast transform."""

import jax.numpy as jnp
import numpy as np
import pytest

from lowbit.core.hadamard import hadamard_factors, hadamard_matrix, hadamard_transform, random_hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 44, 64, 128, 144, 576, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n).astype(np.int64)
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_factors_of_the_model_sizes():
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(576) == (12, 12, 4)
    assert hadamard_factors(64) == (64,)
    assert hadamard_factors(12) == (12,)
    for bad in (3, 9, 18, 28, 0, -4, 2.0, True):
        with pytest.raises(ValueError, match="n must be|no Hadamard matrix"):
            hadamard_factors(bad)


@pytest.mark.parametrize("n", [12, 64, 576, 1536])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    q = random_hadamard(n, np.random.default_rng(3))
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(q, random_hadamard(n, np.random.default_rng(3)))
    assert not np.array_equal(q, random_hadamard(n, np.random.default_rng(4)))


@pytest.mark.parametrize("n", [16, 48, 576, 1536])
def test_fast_transform_equals_the_matrix_product(n):
    x = np.random.default_rng(0).normal(size=(3, 5, n)).astype(np.float32)
    expected = x.astype(np.float64) @ hadamard_matrix(n).astype(np.float64) / np.sqrt(n)
    y = hadamard_transform(jnp.asarray(x))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    moved = hadamard_transform(jnp.asarray(np.moveaxis(x, -1, 0)), axis=0)
    np.testing.assert_allclose(np.moveaxis(np.asarray(moved), 0, -1), expected, atol=2e-5)
