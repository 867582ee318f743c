"""Shared kernel plumbing: choosing an implementation (Pallas or XLA) and tile arithmetic."""

from __future__ import annotations

import jax

IMPLS = ("auto", "pallas", "xla")


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def resolve_impl(impl: str, interpret: bool | None) -> tuple[str, bool]:
    """Map (impl, interpret) to a concrete ("pallas" | "xla", interpret flag).

    "auto" picks Pallas on GPU and the XLA reference elsewhere, unless `interpret=True`
    asks for the Pallas kernel explicitly. `interpret=None` means: interpret when no GPU.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if interpret not in (None, True, False):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    if impl == "auto":
        impl = "pallas" if (on_gpu() or interpret) else "xla"
    if impl == "xla":
        return "xla", False
    if interpret is None:
        interpret = not on_gpu()
    if not interpret and not on_gpu():
        raise ValueError(
            f"interpret=False needs a GPU backend for the Pallas kernel, but the default backend is "
            f"{jax.default_backend()!r}; pass interpret=True (or None) to run it on CPU"
        )
    return "pallas", bool(interpret)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def largest_pow2_divisor(n: int) -> int:
    return n & -n


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap (at least 1)."""
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def is_concrete(x) -> bool:
    """Whether x holds a value we can inspect (not a tracer under jit/vmap)."""
    return not isinstance(x, jax.core.Tracer)
