#!/usr/bin/env bash
# On a GPU machine: run the kernel tests compiled for the GPU (Pallas without interpret mode),
# then the kernel benchmarks. Logs and JSON go to $OUT (or results/gpu_check). About 7 minutes at most.
#
# Needs a python3 whose JAX sees the GPU (jax + a CUDA plugin, e.g. `pip install "jax[cuda12]"`
# where a registry is reachable), plus numpy, pytest and hypothesis. The repo itself is used
# from its checkout via PYTHONPATH, so nothing is installed. PYTHON=... picks the interpreter.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
RESULTS="${OUT:-$REPO/results/gpu_check}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export LOWBIT_KERNEL_TEST_DEVICE=gpu  # the Pallas test classes then run with interpret=False

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c 'import sys, jax, jaxlib; print(sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
} 2>&1 | tee "$RESULTS/environment.txt"

if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)'; then
  echo "JAX does not see a GPU with $PY; install a CUDA-enabled jax (e.g. pip install \"jax[cuda12]\") and retry" \
    | tee -a "$RESULTS/environment.txt"
  exit 2
fi

# 1. Kernel tests on the GPU (Triton compiles every Pallas case once; XLA classes run too).
timeout 180 "$PY" -m pytest tests/kernels -q -p no:cacheprovider --durations=10 \
  --junitxml "$RESULTS/kernel_tests.xml" 2>&1 | tee "$RESULTS/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "kernel tests exit status: $tests_rc" | tee -a "$RESULTS/kernel_tests.log"

# 2. Benchmarks: Pallas next to the XLA path and a bf16 jnp.dot; each part writes its own JSON.
timeout 70 "$PY" benchmarks/kernels.py --ops attention --impls pallas,xla --contexts 512,2048,8192 \
  --repeats 20 --json "$RESULTS/bench_attention.json" 2>&1 | tee "$RESULTS/bench_attention.log"
attention_rc=${PIPESTATUS[0]}
timeout 180 "$PY" benchmarks/kernels.py --ops matmul --impls pallas,xla --quick --repeats 20 \
  --json "$RESULTS/bench_matmul.json" 2>&1 | tee "$RESULTS/bench_matmul.log"
matmul_rc=${PIPESTATUS[0]}

echo "tests=$tests_rc bench_attention=$attention_rc bench_matmul=$matmul_rc" | tee "$RESULTS/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$attention_rc" -eq 0 ] && [ "$matmul_rc" -eq 0 ]
