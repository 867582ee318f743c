"""ACIQ's analytic clipping vs a brute-force search on synthetic Laplace and Gaussian data, and
the MSE of every lowbit clipping observer on the same data. Prints Markdown tables.

Run: .venv/bin/python papers/clipping/synthetic.py   (about half a minute on 2 CPU cores)
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.core.calibrate import aciq_multiplier, clip_threshold, int_grid_steps

SAMPLES = 1_000_000
SEED = 0
BITS = tuple(range(2, 9))
COARSE = 100  # candidate multipliers on [0.3, 1.6] x the ACIQ optimum...
FINE = 100  # ...then this many within one coarse step of the best


@functools.partial(jax.jit, static_argnums=2)
def _uniform_grid_mse(x, alphas, levels: int):
    """MSE of x on the paper's grid (2^M equal bins over [-alpha, alpha], bin midpoints) for
    each alpha in alphas: [K] -> [K]."""

    def one(alpha):
        step = 2.0 * alpha / levels
        index = jnp.clip(jnp.floor(x / step), -levels // 2, levels // 2 - 1)
        return jnp.mean((x - (index + 0.5) * step) ** 2)

    return jax.lax.map(one, alphas)


@functools.partial(jax.jit, static_argnums=2)
def _int_grid_mse(x, alphas, qmax: int):
    """MSE of x on lowbit's symmetric int grid (codes -qmax..qmax, step alpha / qmax)."""

    def one(alpha):
        step = alpha / qmax
        return jnp.mean((x - jnp.clip(jnp.round(x / step), -qmax, qmax) * step) ** 2)

    return jax.lax.map(one, alphas)


def brute_force(curve, x, center: float) -> tuple[float, float]:
    """(alpha, mse) minimizing curve(x, alphas) over a dense two-stage grid around center."""
    coarse = np.linspace(0.3 * center, 1.6 * center, COARSE, dtype=np.float32)
    errors = np.asarray(curve(x, jnp.asarray(coarse)))
    best = int(np.argmin(errors))
    step = coarse[1] - coarse[0]
    fine = np.linspace(coarse[best] - step, coarse[best] + step, FINE, dtype=np.float32)
    fine_errors = np.asarray(curve(x, jnp.asarray(fine)))
    k = int(np.argmin(fine_errors))
    if fine_errors[k] < errors[best]:
        return float(fine[k]), float(fine_errors[k])
    return float(coarse[best]), float(errors[best])


def data() -> dict[str, tuple[np.ndarray, float]]:
    """name -> (samples, the scale ACIQ multiplies: b = E|x - mu| or sigma, from the data)."""
    rng = np.random.default_rng(SEED)
    laplace = rng.laplace(0.0, 1.0, SAMPLES).astype(np.float32)
    gaussian = rng.standard_normal(SAMPLES).astype(np.float32)
    return {"laplace": (laplace, float(np.mean(np.abs(laplace - laplace.mean())))),
            "gaussian": (gaussian, float(np.std(gaussian)))}


def main() -> int:
    start = time.perf_counter()
    sets = data()
    print(f"{SAMPLES:,} samples per distribution (seed {SEED}); b = E|x - mu| (Laplace), "
          "sigma (Gaussian) measured on the samples.\n")
    print("### ACIQ on the paper's grid (2^M equal bins over [-alpha, alpha])\n")
    print("| bits | distribution | ACIQ alpha/scale | brute-force alpha/scale | MSE ACIQ | "
          "MSE brute force | gap |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for name, (x, scale) in sets.items():
        xj = jnp.asarray(x)
        for bits in BITS:
            multiplier = aciq_multiplier(bits, name)
            curve = functools.partial(_uniform_grid_mse, levels=2**bits)
            aciq_mse = float(curve(xj, jnp.asarray([multiplier * scale], jnp.float32))[0])
            alpha, best = brute_force(curve, xj, multiplier * scale)
            print(f"| {bits} | {name} | {multiplier:.3f} | {alpha / scale:.3f} | {aciq_mse:.4e} | "
                  f"{best:.4e} | {100 * (aciq_mse / best - 1):+.2f}% |")

    print("\n### Observers on lowbit's symmetric int grid (codes -qmax..qmax): MSE / brute-force "
          "best\n")
    print("| bits | distribution | best alpha/scale | best MSE | minmax | percentile 99.99 | kl | "
          "mse | ACIQ (paper M) | ACIQ (int grid) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (x, scale) in sets.items():
        xj = jnp.asarray(x)
        for bits in BITS:
            qmax = 2 ** (bits - 1) - 1
            curve = functools.partial(_int_grid_mse, qmax=qmax)
            center = aciq_multiplier(bits, name, steps=int_grid_steps(bits)) * scale
            alpha, best = brute_force(curve, xj, center)
            thresholds = [clip_threshold(x, bits, observer) for observer in
                          ("minmax", "percentile", "kl", "mse", f"aciq_{name}")]
            paper = min(float(np.abs(x).max()), aciq_multiplier(bits, name) * scale)
            thresholds.insert(4, paper)
            errors = np.asarray(curve(xj, jnp.asarray(np.asarray(thresholds, np.float32))))
            ratios = " | ".join(f"{e / best:.3f}" for e in errors)
            print(f"| {bits} | {name} | {alpha / scale:.3f} | {best:.4e} | {ratios} |")
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
