"""Compilation: JAX's persistent compilation cache under the lowbit cache directory (on by default
for the commands), compiled decode steps stored whole so that a later process skips tracing and
lowering too, and a meter of the seconds spent tracing, lowering, compiling or loading per function.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import inspect
import os
import pickle
import re
import threading
import time
import weakref
from pathlib import Path

import jax
from jax.experimental.serialize_executable import deserialize_and_load, serialize

from lowbit.files import atomic_path
from lowbit.kernels.native import native_library

# The events around one jit compilation: tracing, lowering to MLIR, and the backend compile
# (which, on a persistent-cache hit, is the time to read the executable back), and the time to
# load a stored executable (StoredJit).
LOAD_EVENT = "/lowbit/decode/executable_load_duration"
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration", LOAD_EVENT)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
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
    of a similar length) loads its prefill and decode steps instead of compiling them; StoredJit
    keeps whole executables under <directory>/lowbit-executables. Returns the directory, or None when the cache is turned off."""
    path = Path(directory) if directory is not None else compilation_cache_dir()
    if path is None:
        StoredJit.directory = None
        return None
    path.mkdir(parents=True, exist_ok=True)
    StoredJit.directory = path / "lowbit-executables"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@functools.cache
def source_fingerprint() -> str:
    """sha256 of every lowbit source file and the JAX/jaxlib/Flax versions: a stored executable
    is only reused by the same code on the same libraries."""
    import flax

    digest = hashlib.sha256(f"{jax.__version__} {jax.lib.__version__} {flax.__version__}".encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _Signature:
    """The pytree structure and (shape, dtype, weak type) of every leaf of one dynamic argument,
    hashed once (a decoder's parameters have hundreds of leaves)."""

    __slots__ = ("key", "_hash")

    def __init__(self, tree):
        leaves, treedef = jax.tree.flatten(tree)
        avals = tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
                      for x in map(jax.typeof, leaves))
        self.key = (treedef, avals)
        self._hash = hash(self.key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, _Signature) and self._hash == other._hash and self.key == other.key

    def __repr__(self) -> str:
        return repr(self.key)


class StoredJit:
    """jax.jit(function, static_argnames, donate_argnames) whose executables are kept in memory and,
    when enable_compilation_cache() has set StoredJit.directory, on disk: a later process with the
    same lowbit source, JAX version, device, static arguments and argument shapes loads the
    executable without tracing or lowering (JAX's own persistent cache still traces and lowers the
    whole model to compute its key). Static arguments must have a deterministic repr.

    Each of its two lookup tables keeps at most `capacity` executables (least recently used dropped):
    each loaded executable holds its machine code and about nine memory maps, so a process that
    decodes with many models (a sweep) would otherwise grow without bound and, past Linux's 65530
    maps per process, crash inside the next compilation."""

    directory: Path | None = None
    capacity = 16
    _instances: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, function, static_argnames: tuple[str, ...], donate_argnames: tuple[str, ...] = ()):
        self.function = function
        self.donate_argnames = tuple(donate_argnames)
        self.signature = inspect.signature(function)
        self.static_argnames = tuple(static_argnames)
        self.name = function.__name__
        self.executables: collections.OrderedDict = collections.OrderedDict()
        # (ids of the static arguments, shapes) -> (those arguments, executable): a call with the
        # same static objects (a decoder passes one graphdef every step) skips hashing them, which
        # walks the whole model graph (about 15 ms a step for SmolLM2-135M); holding the arguments
        # keeps their ids from being reused.
        self._by_identity: collections.OrderedDict = collections.OrderedDict()
        # argument name -> (weak reference to the last value, its _Signature): the same parameters
        # passed again (every decode step) are not flattened again (about 6 ms a step for
        # SmolLM2-135M's 500 leaves, measured). Should such a value change shape in place, the
        # executable refuses it (TypeError) and the call is looked up again from scratch.
        self._seen: dict[str, tuple[weakref.ref, _Signature]] = {}
        self._compiled = 0
        functools.update_wrapper(self, function)
        StoredJit._instances.add(self)

    @classmethod
    def clear_all(cls) -> None:
        """Drops the executables every StoredJit holds in memory (the files on disk stay)."""
        for stored in list(cls._instances):
            stored.executables.clear()
            stored._by_identity.clear()
            stored._seen.clear()

    @functools.cached_property
    def jitted(self):
        """jax.jit of the function under a name that carries the source fingerprint: JAX's own
        persistent cache then never serves it after a code change (a re-serialized executable read
        from that cache lacks its compiled functions on CPU, jax 0.10.2, so it must not be stored)."""

        def function(*args, **kwargs):
            return self.function(*args, **kwargs)

        functools.update_wrapper(function, self.function)
        function.__name__ = f"{self.name}_{source_fingerprint()[:12]}"
        return jax.jit(function, static_argnames=self.static_argnames, donate_argnames=self.donate_argnames)

    def compiled_count(self) -> int:
        """How many executables (static arguments and shapes) this process has compiled or loaded."""
        return self._compiled

    def _path(self, static: dict, signature: tuple) -> Path:
        device = jax.devices()[0]
        text = repr((self.name, source_fingerprint(), device.platform, device.device_kind,
                     jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                     sorted(static.items()), signature))
        text = re.sub(r" at 0x[0-9a-f]+", "", text)  # functions in a graphdef print their address
        return self.directory / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()}.pkl"

    def _load_or_compile(self, bound, static: dict, signature: tuple):
        path = None if self.directory is None else self._path(static, signature)
        if path is not None and path.is_file():
            start = time.perf_counter()
            native_library()  # an executable that calls the native kernels needs their FFI targets
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                executable = deserialize_and_load(payload, in_tree, out_tree)
            except Exception:  # written by another jaxlib build, or truncated: compile again
                executable = None
            if executable is not None:
                jax.monitoring.record_event_duration_secs(LOAD_EVENT, time.perf_counter() - start,
                                                          fun_name=self.name)
                return executable
        hits = []
        listener = lambda event, **kwargs: hits.append(event) if event == CACHE_HIT_EVENT else None  # noqa: E731
        jax.monitoring.register_event_listener(listener)
        try:
            executable = self.jitted.lower(**bound.arguments).compile()  # called by keyword
        finally:
            jax.monitoring.unregister_event_listener(listener)
        if path is not None and not hits:  # never re-serialize an executable JAX's cache read back
            with atomic_path(path) as partial:
                partial.write_bytes(pickle.dumps(serialize(executable)))
        return executable

    def _argument_signature(self, name: str, value) -> _Signature:
        seen = self._seen.get(name)
        if seen is not None and value is not None and seen[0]() is value:  # a dead reference gives None
            return seen[1]
        signature = _Signature(value)
        try:
            self._seen[name] = (weakref.ref(value), signature)
        except TypeError:  # not weakly referenceable (a tuple, a number): flattened on every call
            self._seen.pop(name, None)
        return signature

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        static = {name: bound.arguments[name] for name in self.static_argnames}
        dynamic = {name: value for name, value in bound.arguments.items() if name not in static}
        signature = tuple(self._argument_signature(name, value) for name, value in dynamic.items())
        fast_key = (tuple(id(value) for value in static.values()), signature)
        held = self._by_identity.get(fast_key)
        if held is None:
            key = (tuple(static.items()), signature)
            executable = self.executables.get(key)
            if executable is None:
                executable = self._load_or_compile(bound, static, signature)
                self._compiled += 1
            _remember(self.executables, key, executable, self.capacity)
            held = (tuple(static.values()), executable)
        _remember(self._by_identity, fast_key, held, self.capacity)
        try:
            return held[1](**dynamic)
        except TypeError:
            if tuple(_Signature(value) for value in dynamic.values()) == signature:
                raise
            self._seen.clear()  # a remembered argument changed shape or dtype in place: look again
            return self(*args, **kwargs)


def _remember(table: collections.OrderedDict, key, value, capacity: int) -> None:
    """table[key] = value as the most recently used entry, dropping the oldest beyond `capacity`."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > capacity:
        table.popitem(last=False)


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
