#!/usr/bin/env bash
# On a GPU machine: run the kernel tests compiled for the GPU (Pallas without interpret mode),
# then the kernel benchmarks, then the other kernel tests. Logs and JSON go to $OUT (or
# results/gpu_check). About 6 minutes at most.
#
# Needs a python3 whose JAX sees the GPU (jax + a CUDA plugin, e.g. `pip install "jax[cuda12]"`
# where a registry is reachable), plus numpy, pytest, pytest-xdist and hypothesis. The repo itself is used
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

# Wheels carried to a machine with no registry (.whl/, e.g. gguf, which test_gguf_matmul imports).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# Several pytest workers share the GPU: no worker takes most of its memory up front.
pytest_gpu() {  # pytest_gpu SECONDS NAME PYTEST-ARGS...
  local limit=$1 name=$2; shift 2
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$limit" "$PY" -m pytest tests/kernels -q -p no:cacheprovider \
    -n "${WORKERS:-8}" --durations=10 --junitxml "$RESULTS/$name.xml" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name exit status: $rc" | tee -a "$RESULTS/$name.log"
  return "$rc"
}

# 1. The Pallas kernel tests compiled by Triton (the native classes skip on a GPU backend).
pytest_gpu 100 tests_pallas -k "Pallas or pallas or triton"
pallas_rc=$?

# 2. Benchmarks: Pallas next to the XLA path and a bf16 jnp.dot; each part writes its own JSON.
timeout 40 "$PY" benchmarks/kernels.py --ops attention --impls pallas,xla --contexts 512,2048,8192 \
  --repeats 20 --json "$RESULTS/bench_attention.json" 2>&1 | tee "$RESULTS/bench_attention.log"
attention_rc=${PIPESTATUS[0]}
timeout 120 "$PY" benchmarks/kernels.py --ops matmul --impls pallas,xla --quick --repeats 20 \
  --json "$RESULTS/bench_matmul.json" 2>&1 | tee "$RESULTS/bench_matmul.log"
matmul_rc=${PIPESTATUS[0]}

# 3. The remaining kernel tests (XLA paths and references) on the GPU; the real-model test needs the
# GGUF fetched from a package registry, which a device machine cannot reach.
pytest_gpu 80 tests_xla -k "not (Pallas or pallas or triton)" \
  --deselect tests/kernels/test_gguf_matmul.py::test_real_model_tensors
xla_rc=$?

echo "tests_pallas=$pallas_rc bench_attention=$attention_rc bench_matmul=$matmul_rc tests_xla=$xla_rc" \
  | tee "$RESULTS/summary.txt"
[ "$pallas_rc" -eq 0 ] && [ "$attention_rc" -eq 0 ] && [ "$matmul_rc" -eq 0 ] && [ "$xla_rc" -eq 0 ]
