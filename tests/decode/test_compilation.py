"""The persistent compilation cache (a second process loads what the first compiled) and the
compile-seconds meter."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.decode.compilation import CompileMeter, StoredJit, compilation_cache_dir

SCRIPT = """
import json, time, jax, jax.numpy as jnp
from lowbit.decode.compilation import CompileMeter, enable_compilation_cache
enable_compilation_cache()
@jax.jit
def twenty_matmuls(x):
    for _ in range(20):
        x = jnp.tanh(x @ x)
    return x
with CompileMeter() as meter:
    twenty_matmuls(jnp.ones((32, 32))).block_until_ready()
print(json.dumps({"compile_s": meter.seconds_of("twenty_matmuls")}))
"""


def _run(env):
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_the_executable_from_the_cache(tmp_path):
    env = dict(os.environ, LOWBIT_COMPILE_CACHE=str(tmp_path / "jax"), JAX_PLATFORMS="cpu")
    first = _run(env)
    entries = [p.name for p in (tmp_path / "jax").iterdir()]
    assert any("twenty_matmuls" in name for name in entries), entries
    second = _run(env)
    assert second["compile_s"] < first["compile_s"], (first, second)


STEPS_SCRIPT = """
import collections, json, jax
from flax import nnx
from lowbit.decode import generate
from lowbit.decode.compilation import enable_compilation_cache
from lowbit.models.llama import Llama, LlamaConfig
enable_compilation_cache()
events = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: events.update([event.rsplit("/", 1)[-1]] if "step" in str(kw.get("fun_name")) else []))
model = Llama(LlamaConfig.tiny(ffn_dim=80), rngs=nnx.Rngs(0))
tokens = generate(model, [5, 6, 7, 8, 9], 4).tolist()
print(json.dumps({"tokens": tokens, "events": events}))
"""


def _steps_run(env) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_stored_steps_without_tracing(tmp_path):
    env = dict(os.environ, LOWBIT_COMPILE_CACHE=str(tmp_path / "jax"), JAX_PLATFORMS="cpu")
    first, second = _steps_run(env), _steps_run(env)
    assert first["events"]["jaxpr_trace_duration"] == 2  # the prefill and the decode step
    assert second["events"] == {"executable_load_duration": 2}, second
    assert second["tokens"] == first["tokens"]
    stored = tmp_path / "jax" / "lowbit-executables"
    assert sorted(p.name.split("-")[0] for p in stored.iterdir()) == ["_decode_steps", "_prefill_step"]
    # Re-serializing an executable that JAX's persistent cache read back loses its compiled
    # functions (jax 0.10.2, CPU): a process whose stored executables are gone but whose JAX cache
    # entries remain must not write them, so that the next process still runs.
    shutil.rmtree(stored)
    third = _steps_run(env)
    assert third["events"]["jaxpr_trace_duration"] == 2 and not (stored.exists() and any(stored.iterdir()))
    assert _steps_run(env)["tokens"] == third["tokens"] == first["tokens"]


def test_cache_directory_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "root"))
    monkeypatch.delenv("LOWBIT_COMPILE_CACHE", raising=False)
    assert compilation_cache_dir() == tmp_path / "root" / "jax"
    monkeypatch.setenv("LOWBIT_COMPILE_CACHE", "off")
    assert compilation_cache_dir() is None
    monkeypatch.setenv("LOWBIT_COMPILE_CACHE", str(tmp_path / "elsewhere"))
    assert compilation_cache_dir() == tmp_path / "elsewhere"


def test_meter_counts_compilation_per_function():
    @jax.jit
    def prefill_like(x):
        return jnp.sin(x) * 2

    with CompileMeter() as meter:
        prefill_like(jnp.ones(7)).block_until_ready()
        compiled = meter.seconds_of("prefill_like")
        prefill_like(jnp.ones(7)).block_until_ready()  # cached in memory: no new compilation
    assert compiled > 0 and meter.seconds_of("prefill_like") == compiled
    assert meter.seconds >= compiled and meter.seconds_of("no_such_function") == 0
    prefill_like(jnp.ones(9)).block_until_ready()  # after exit: not counted
    assert meter.seconds_of("prefill_like") == compiled


def test_stored_jit_holds_at_most_capacity_executables(monkeypatch):
    """Executables past the capacity are dropped least recently used first (a long sweep must not
    hold every model's steps); a dropped one is compiled again when needed, and clear_all drops all."""

    def scaled(x, factor):
        return x * factor

    stored = StoredJit(scaled, ("factor",))
    monkeypatch.setattr(stored, "capacity", 2)
    for factor in (2, 2, 3, 4, 2):
        assert float(stored(jnp.ones(3), factor=factor)[0]) == factor
    held = [key[0] for key in stored.executables]
    assert held == [(("factor", 4),), (("factor", 2),)] and len(stored._by_identity) == 2
    assert stored.compiled_count() == 4  # the repeated 2 reused its executable; the last 2 had been dropped
    StoredJit.clear_all()
    assert not stored.executables and not stored._by_identity


def test_stored_jit_remembers_an_arguments_signature_and_notices_an_in_place_change():
    """The same parameters object passed again is not flattened again (its signature is reused);
    if it changes shape in place, the call still computes with the new shape (compiled anew)."""

    def total(params, x):
        return params["w"].sum() + x

    stored = StoredJit(total, ())
    params = {"w": jnp.ones(3)}
    params_state = nnx.State(params)
    assert float(stored(params_state, jnp.float32(1))) == 4
    remembered = stored._seen["params"][1]
    assert float(stored(params_state, jnp.float32(2))) == 5
    assert stored._seen["params"][1] is remembered and stored.compiled_count() == 1
    params_state["w"] = jnp.ones(5)  # same object, new shape
    assert float(stored(params_state, jnp.float32(1))) == 6
    assert stored.compiled_count() == 2


def test_stored_jit_does_not_take_none_for_a_remembered_argument_that_died():
    """A remembered argument's weak reference gives None once the value is freed: a later call
    that passes None must not reuse the dead value's signature (nor its executable)."""

    def shifted(x, key=None):
        return x if key is None else x + key

    stored = StoredJit(shifted, ())
    assert float(stored(jnp.ones(1), jnp.float32(2))[0]) == 3  # the key array dies after the call
    assert float(stored(jnp.ones(2), None)[0]) == 1  # a new shape: compiled now, for key=None
    assert float(stored(jnp.ones(2), jnp.float32(5))[0]) == 6
