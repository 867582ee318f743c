"""Compilation: JAX's persistent compilation cache under the lowbit cache directory (on by default
for the commands), and a meter of the seconds spent tracing, lowering and compiling per function.
"""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import jax

# The events around one jit compilation: tracing, lowering to MLIR, and the backend compile
# (which, on a persistent-cache hit, is the time to read the executable back).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
OFF = ("0", "off", "false", "no")


def compilation_cache_dir() -> Path | None:
    """$LOWBIT_COMPILE_CACHE, else <lowbit cache>/jax ($LOWBIT_CACHE, default ~/.cache/lowbit);
    None when $LOWBIT_COMPILE_CACHE is 0/off/false/no."""
    from lowbit.models.registry import cache_dir

    setting = os.environ.get("LOWBIT_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF:
        return None
    return Path(setting).expanduser() if setting else cache_dir() / "jax"


def enable_compilation_cache(directory: str | Path | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at `directory` (default compilation_cache_dir())
    and caches every executable, however fast it compiled, so that a later process (a new prompt
    of a similar length) loads its prefill and decode steps instead of compiling them.
    Returns the directory, or None when the cache is turned off."""
    path = Path(directory) if directory is not None else compilation_cache_dir()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _function_name(name: str | None) -> str:
    """'jit(decode_step)' and 'decode_step' -> 'decode_step'."""
    name = name or "?"
    return name[4:-1] if name.startswith("jit(") and name.endswith(")") else name


class CompileMeter:
    """Seconds of compilation per jitted function name while installed (a context manager);
    nested or concurrent meters each see every event."""

    def __init__(self):
        self.seconds_by_function: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()

    def _record(self, event: str, duration: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self.seconds_by_function[_function_name(kwargs.get("fun_name"))] += duration

    def __enter__(self) -> CompileMeter:
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)

    @property
    def seconds(self) -> float:
        """All compilation seconds so far."""
        return sum(self.seconds_by_function.values())

    def seconds_of(self, word: str) -> float:
        """Compilation seconds of the functions whose name contains `word` (e.g. "prefill")."""
        return sum(s for name, s in self.seconds_by_function.items() if word in name)
