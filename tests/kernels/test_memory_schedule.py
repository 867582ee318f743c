"""The CPU schedule lowbit asks XLA for keeps one packed layer's dequantized weight alive at a
time in a whole-model jit, not all of them (the concurrency scheduler's default hoists them): the
XLA path's dequantization and the native one that "auto" runs for prefill alike."""

import json
import os
import subprocess
import sys

import pytest

_PROGRAM = r"""
import json, sys
from lowbit.kernels.dispatch import schedule_cpu_for_memory
in_force = schedule_cpu_for_memory() if sys.argv[1] == "memory" else False
import jax, jax.numpy as jnp, numpy as np
from lowbit.core.packing import pack
from lowbit.core.quantize import quantize
from lowbit.kernels import packed_matmul

layers, width, rows = 12, 512, 256
rng = np.random.default_rng(0)
weights = [pack(quantize(jnp.asarray(rng.normal(size=(width, width)), jnp.float32), "int4:g64",
                         axis=0)) for _ in range(layers)]

def forward(x, weights):
    for w in weights:
        x = jnp.tanh(packed_matmul(x, w, impl=sys.argv[2]))
    return x

x = jnp.ones((rows, width), jnp.float32)
compiled = jax.jit(forward).lower(x, weights).compile()
print(json.dumps({"in_force": in_force,
                  "temp": compiled.memory_analysis().temp_size_in_bytes,
                  "float_weight": width * width * 4, "layers": layers,
                  "activation": rows * width * 4}))
"""


def _temp_bytes(schedule: str, impl: str) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", _PROGRAM, schedule, impl], env=env, check=True,
                          capture_output=True, text=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_memory_schedule_keeps_one_dequantized_weight_alive(impl):
    from lowbit.kernels.native import native_available

    if impl == "auto" and not native_available():
        pytest.skip("the native kernels are not built here")
    run = _temp_bytes("memory", impl)
    assert run["in_force"]
    # one layer's float weight (dequantized), a few activations and the dot's own workspace;
    # hoisted dequantizations would need layers x float_weight (12 MiB here)
    bound = 2 * run["float_weight"] + 6 * run["activation"]
    assert run["temp"] <= bound, run
    assert bound < run["layers"] * run["float_weight"] / 2


def test_a_users_own_setting_is_kept(monkeypatch):
    from lowbit.kernels.dispatch import MEMORY_SCHEDULE_FLAG, schedule_cpu_for_memory

    option = MEMORY_SCHEDULE_FLAG.split("=")[0]
    monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true {option}=true")
    assert schedule_cpu_for_memory() is False
    assert os.environ["XLA_FLAGS"] == f"--xla_cpu_multi_thread_eigen=true {option}=true"
    monkeypatch.setenv("XLA_FLAGS", MEMORY_SCHEDULE_FLAG)
    assert schedule_cpu_for_memory() is True
