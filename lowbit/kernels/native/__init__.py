"""The native CPU kernels: compiled from lowbit_native.cc by the C++ compiler on first use, cached, and
registered with XLA as FFI targets. `native_library()` is None (after one warning) when that fails."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import jax

from lowbit.files import atomic_path

SOURCE = Path(__file__).with_name("lowbit_native.cc")
# -O3 without -march: the AVX2 code carries its own target attribute and is chosen at run time,
# so the cached library also runs on a CPU without AVX2.
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
# FFI target name -> symbol exported by the library.
TARGETS = {
    "lowbit_packed_matmul": "LowbitPackedMatmul",
    "lowbit_packed_matmul_transposed": "LowbitPackedMatmulTransposed",
    "lowbit_packed_dequantize": "LowbitPackedDequantize",
    "lowbit_gguf_matmul": "LowbitGgufMatmul",
    "lowbit_gguf_matmul_transposed": "LowbitGgufMatmulTransposed",
    "lowbit_gguf_dequantize": "LowbitGgufDequantize",
    "lowbit_int8_matmul": "LowbitInt8Matmul",
    "lowbit_decode_attention": "LowbitDecodeAttention",
}

_lock = threading.Lock()
_state: dict = {"tried": False, "library": None, "error": None}


def cache_dir() -> Path:
    """Where built libraries live: $LOWBIT_CACHE/native (default ~/.cache/lowbit/native)."""
    root = os.environ.get("LOWBIT_CACHE") or str(Path.home() / ".cache" / "lowbit")
    return Path(root) / "native"


def _compiler() -> str:
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"no C++ compiler found ({name!r}; set CXX to choose one)")
    return path


def _build_key(compiler: str, include: str) -> str:
    """Hash of everything the binary depends on: source, flags, compiler, FFI headers, machine."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(CXX_FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(version.encode())
    digest.update((Path(include) / "xla" / "ffi" / "api" / "api.h").read_bytes())
    digest.update(platform.machine().encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on `path` (fcntl where it exists), so that concurrent processes build once."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): builds may race, but each writes atomically
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_library() -> Path:
    """Compile the kernels unless a library for this source, compiler and jax is cached; its path."""
    compiler = _compiler()
    include = jax.ffi.include_dir()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"lowbit_native-{_build_key(compiler, include)}.so"
    with _file_lock(folder / "build.lock"):
        if target.exists():
            return target
        with atomic_path(target) as temporary:
            command = [compiler, *CXX_FLAGS, f"-I{include}", str(SOURCE), "-o", str(temporary)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}")
    return target


def native_library():
    """The loaded library with its FFI targets registered, or None when the backend is unavailable.

    Set LOWBIT_NATIVE=0 to turn the backend off. The first failure warns once; later calls return None.
    """
    with _lock:
        if _state["tried"]:
            return _state["library"]
        _state["tried"] = True
        if os.environ.get("LOWBIT_NATIVE", "1") == "0":
            _state["error"] = "turned off by LOWBIT_NATIVE=0"
            return None
        try:
            library = ctypes.CDLL(str(build_library()))
            for name, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
            _state["error"] = str(error)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(f"lowbit: native CPU kernels unavailable ({first_line}); using the XLA path",
                          RuntimeWarning, stacklevel=2)
            return None
        _state["library"] = library
        return library


def native_available() -> bool:
    """Whether the native CPU kernels are built and loaded (builds them on the first call)."""
    return native_library() is not None


def native_error() -> str | None:
    """Why the native backend is unavailable (None when it loaded or was not tried yet)."""
    return _state["error"]


def _loaded():
    library = native_library()
    if library is None:
        raise RuntimeError(f"the native CPU kernels are unavailable: {native_error()}")
    return library


def simd_level() -> int:
    """The SIMD code the kernels run on this CPU: 2 AVX-512 VNNI for the int8-activation GEMVs (AVX2
    elsewhere), 1 AVX2+FMA+F16C, 0 the portable scalar code."""
    return int(_loaded().lowbit_native_simd_level())


@contextlib.contextmanager
def simd_at_most(level: int):
    """Within the block, every native call in this process runs SIMD code of at most `level` (0: the
    portable scalar code, 1: AVX2, 2: everything this CPU has); for tests that compare the paths. The
    kernels read the cap when they run, so wait for results inside the block (np.asarray(y)); the
    cap in force before the block comes back after it (blocks nest)."""
    if level not in (0, 1, 2):
        raise ValueError(f"level must be 0, 1 or 2, got {level!r}")
    library = _loaded()
    previous = int(library.lowbit_native_simd_limit())
    library.lowbit_native_set_simd(level)
    try:
        yield
    finally:
        library.lowbit_native_set_simd(previous)


def portable_code_only():
    """Within the block, every native call in this process runs the portable scalar code (for tests)."""
    return simd_at_most(0)
