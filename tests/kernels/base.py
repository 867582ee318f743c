"""One test base for every kernel implementation, as tokamax does: an op's test base holds the
checks, and one class per implementation (XLA, Pallas, native CPU) mixes in where it runs."""

from __future__ import annotations

import os
import shutil
import threading

import jax
import pytest

from lowbit.kernels.native import native_available, native_error

# LOWBIT_KERNEL_TEST_DEVICE=gpu runs the Pallas classes compiled for the GPU instead of interpreted.
ON_GPU = os.environ.get("LOWBIT_KERNEL_TEST_DEVICE", "cpu") == "gpu"


def run_concurrently(calls, repeats: int) -> list[list]:
    """Runs each call `repeats` times on its own Python thread, all threads released together;
    returns each call's results in order (a thread-safety check of a kernel)."""
    results = [[] for _ in calls]
    barrier = threading.Barrier(len(calls))

    def worker(i):
        barrier.wait()
        for _ in range(repeats):
            results[i].append(calls[i]())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(r) == repeats for r in results)
    return results


class KernelTestBase:
    """What an op's test base needs from the implementation under test."""

    impl: str = "xla"
    interpret: bool | None = None
    # Largest |y - expected| / max |expected| for float32 math (products summed in another order).
    float32_tolerance: float = 2e-5


class XlaImpl(KernelTestBase):
    impl = "xla"


class PallasImpl(KernelTestBase):
    """Pallas kernels: interpreted on CPU; compiled by Triton with LOWBIT_KERNEL_TEST_DEVICE=gpu. Every
    f32 dot in the kernels says precision=HIGHEST, which Triton lowers to IEEE f32 (not TF32), so the
    GPU meets the same f32 bound; only the order of the sums differs."""

    impl = "pallas"
    interpret = not ON_GPU


class NativeImpl(KernelTestBase):
    """The C++ kernels through the XLA FFI. Skipped when JAX's backend is not the CPU (the GPU check)
    or the machine has no C++ compiler; where one exists, a failed build is a test failure."""

    impl = "native"

    @pytest.fixture(autouse=True)
    def _native_backend(self):
        if jax.default_backend() != "cpu":
            pytest.skip(f"the native kernels run on the CPU backend, not {jax.default_backend()!r}")
        if not native_available():
            if shutil.which(os.environ.get("CXX") or "g++") is None:
                pytest.skip(f"no C++ compiler: {native_error()}")
            pytest.fail(f"the native CPU kernels did not build or load: {native_error()}")
