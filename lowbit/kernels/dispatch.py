"""Shared kernel plumbing: choosing an implementation (Pallas, native CPU or XLA) and tile arithmetic."""

from __future__ import annotations

import os

import jax

from lowbit.kernels.native import native_available, native_error

IMPLS = ("auto", "pallas", "native", "xla")
# "auto" uses the native CPU kernels for at most this many activation rows; above, the weight
# dequantized for the call and XLA's dot win (benchmarks/RESULTS.md: GGUF blocks tied at 64 rows, XLA
# 1.6-3.5x faster at 512; the packed GEMM's forward 0.42-1.54x XLA's over 16-512 rows on an AMD host,
# 0.49-0.59x the f32 dot at 512 rows on an AVX-512 Intel host, where XLA's dot runs 16 wide).
# int8_matmul and gguf_matmul's f32 activations follow it; packed_matmul's too, while its int8
# activations keep the native int8 GEMV at any row count (gguf_matmul sends int8 prefill to XLA).
NATIVE_MAX_ROWS = 32
# The native packed forward switches from its GEMV to the blocked GEMM (a dequantized panel of W in
# cache, an FMA micro-kernel over all rows) at this many activation rows.
NATIVE_GEMM_ROWS = 24
# How the quantized matmuls (gguf_matmul, packed_matmul) meet their input: "f32" as it is, or "int8"
# rounded per row and block to round(x / d) * d, d = max|x| / 127 (ggml's q8), with integer dots.
ACTIVATIONS = ("f32", "int8")
# What their APIs and layers also take: "auto", int8 where the native integer GEMV runs (fewer than
# NATIVE_GEMM_ROWS rows of x: decode) and f32 elsewhere (the prefill GEMM, which is faster on f32 x,
# benchmarks/RESULTS.md; and every non-native impl, where int8 would only add a rounding).
ACTIVATION_MODES = (*ACTIVATIONS, "auto")


def check_activations(activations: str, modes: tuple[str, ...] = ACTIVATION_MODES) -> str:
    """`activations` when it is one of `modes`, else a ValueError naming them."""
    if activations not in modes:
        raise ValueError(f"activations must be one of {modes}, got {activations!r}")
    return activations


def choose_activations(activations: str, impl: str, rows: int, int8_ok: bool = True) -> str:
    """The activations one call computes with: "auto" becomes "int8" on the native impl below
    NATIVE_GEMM_ROWS rows of x when the weights' grid is integer (int8_ok), else "f32"."""
    if activations != "auto":
        return activations
    return "int8" if impl == "native" and rows < NATIVE_GEMM_ROWS and int8_ok else "f32"


# XLA's CPU compiler by default schedules for concurrency: it runs every op whose inputs are
# ready as early as possible, so in a whole-model jit each packed layer's dequantization (which
# depends on parameters only) runs at the start and every float weight stays alive at once
# (SmolLM2 int4: +423 MiB of temporaries). Its memory-minimizing scheduler runs each one where
# it is used (97 MiB): benchmarks/RESULTS.md, "packed checkpoint memory".
MEMORY_SCHEDULE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def schedule_cpu_for_memory() -> bool:
    """Asks XLA's CPU compiler for its memory-minimizing schedule (MEMORY_SCHEDULE_FLAG, added to
    XLA_FLAGS) unless XLA_FLAGS already sets that option. It takes effect only before JAX's
    first computation, so call it at the start of a program (the lowbit CLI does); returns
    whether the schedule is in force for this process."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    option = MEMORY_SCHEDULE_FLAG.split("=")[0]
    if option in flags:
        return MEMORY_SCHEDULE_FLAG in flags.split()
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULE_FLAG}".strip()
    return True


def on_gpu() -> bool:
    """True when JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def resolve_impl(impl: str, interpret: bool | None, *, has_native: bool = False) -> tuple[str, bool]:
    """Map (impl, interpret) to a concrete ("pallas" | "native" | "xla", interpret flag).

    "auto" picks Pallas on GPU, the native CPU kernels on CPU when the op has them (`has_native`) and
    they are built, and the XLA reference otherwise; `interpret=True` asks for the Pallas kernel
    explicitly. `interpret=None` means: interpret when no GPU. "native" fails with a ValueError
    when the op has no native kernel, the backend is not CPU, or the library could not be built.
    """
    allowed = IMPLS if has_native else tuple(i for i in IMPLS if i != "native")
    if impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}")
    if interpret not in (None, True, False):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")
    if impl == "auto":
        if on_gpu() or interpret:
            impl = "pallas"
        else:
            impl = "native" if has_native and jax.default_backend() == "cpu" and native_available() else "xla"
    if impl == "xla":
        return "xla", False
    if impl == "native":
        if jax.default_backend() != "cpu":
            raise ValueError(f"impl='native' runs on the CPU backend only; the default backend is "
                             f"{jax.default_backend()!r}")
        if not native_available():
            raise ValueError(f"impl='native': the native CPU kernels are unavailable ({native_error()}); "
                             "use impl='xla' or 'auto'")
        return "native", False
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


def pad_to(a, shape: tuple[int, ...]):
    """Zero-pad `a` at the end of each axis up to `shape`; `a` itself when it already has that shape."""
    if tuple(a.shape) == tuple(shape):
        return a
    import jax.numpy as jnp

    return jnp.pad(a, [(0, target - size) for size, target in zip(a.shape, shape)])


def is_concrete(x) -> bool:
    """Whether x holds a value we can inspect (not a tracer under jit/vmap)."""
    return not isinstance(x, jax.core.Tracer)
