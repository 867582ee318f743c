"""Hadamard matrices (Sylvester for powers of two, Paley I for 4p with 4p - 1 prime, Kronecker
products of both), randomized orthogonal Hadamard rotations, and the fast transform x @ H / sqrt(n).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _check_order(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer (a Hadamard order), got {n!r}")
    return int(n)


def hadamard_factors(n: int) -> tuple[int, ...]:
    """The orders whose Kronecker product builds a Hadamard matrix of order n, in order: one Paley
    factor 4p for each odd prime factor p of n (needs 4p - 1 prime: 12, 20, 44, ...; each takes
    two factors of 2 from n), then one power of two (Sylvester) for what is left.
    1536 = 12 x 128; 576 = 12 x 12 x 4. ValueError when no such product exists (e.g. n odd > 1)."""
    n = _check_order(n)
    odd, twos = n, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    primes = []
    p = 3
    while odd > 1:
        while odd % p == 0:
            primes.append(p)
            odd //= p
        p += 2
    bad = [p for p in primes if not _is_prime(4 * p - 1)]
    if bad or twos < 2 * len(primes):
        raise ValueError(f"no Hadamard matrix of order {n} is built here: orders are products of "
                         "a power of two and Paley orders 4p (4p - 1 prime: 12, 20, 44, ...), "
                         f"e.g. 64, 576 = 12*12*4, 1536 = 12*128; got {n}")
    rest = 2 ** (twos - 2 * len(primes))
    return tuple(4 * p for p in primes) + ((rest,) if rest > 1 or not primes else ())


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley(order: int) -> np.ndarray:
    """Paley construction I: q = order - 1 prime, q = 3 mod 4; H = I + [[0, 1^T], [-1, Q]] with
    Q the Jacobsthal matrix Q[i, j] = chi(j - i) (chi: the quadratic character mod q)."""
    q = order - 1
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], np.int8)
    jacobsthal = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    s = np.zeros((order, order), np.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + np.eye(order, dtype=np.int8)


@functools.lru_cache(maxsize=32)
def _factor_matrix(order: int) -> np.ndarray:
    h = _sylvester(order) if order & (order - 1) == 0 else _paley(order)
    h.setflags(write=False)
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """A Hadamard matrix of order n: int8 entries +-1 with H H^T = n I (the Kronecker product of
    hadamard_factors(n)'s matrices, in that order)."""
    h = np.ones((1, 1), np.int8)
    for order in hadamard_factors(n):
        h = np.kron(h, _factor_matrix(order))
    return h


def random_hadamard(n: int, rng: np.random.Generator) -> np.ndarray:
    """A randomized orthogonal Hadamard rotation diag(s) H / sqrt(n), float64 [n, n], with random
    signs s from `rng` (QuIP#'s / QuaRot's incoherence rotation)."""
    signs = rng.choice(np.array([-1.0, 1.0]), size=_check_order(n))
    return signs[:, None] * hadamard_matrix(n).astype(np.float64) / np.sqrt(n)


def hadamard_transform(x, axis: int = -1):
    """x @ H / sqrt(n) along `axis` (n = x.shape[axis], H = hadamard_matrix(n)), computed one
    Kronecker factor at a time (n * sum(factors) multiply-adds per vector, not n^2). Orthogonal:
    it keeps norms; its inverse is x @ H^T / sqrt(n). Math in f32, result in x's dtype."""
    x = jnp.asarray(x)
    axis = axis % x.ndim
    n = x.shape[axis]
    factors = hadamard_factors(n)
    moved = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
    lead = moved.shape[:-1]
    y = moved.reshape(*lead, *factors)
    k = len(lead)
    for i, order in enumerate(factors):
        h = jnp.asarray(_factor_matrix(order), jnp.float32)
        y = jnp.moveaxis(jnp.tensordot(y, h, axes=([k + i], [0])), -1, k + i)
    y = (y * np.float32(1.0 / np.sqrt(n))).reshape(*lead, n)
    return jnp.moveaxis(y, -1, axis).astype(x.dtype)
