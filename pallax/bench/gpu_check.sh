#!/usr/bin/env bash
# Every GPU test and benchmark in one call, for a machine with an NVIDIA GPU and
# JAX already installed (no network; nothing is installed). Writes logs and JSON
# to $OUT (or the folder given as $1) and finishes within about 8 minutes.
#
#   OUT=/tmp/out bash pallax/bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)

{ nvidia-smi; "$PY" -c 'import jax; print(jax.__version__, jax.devices())'; } \
  >"$OUT/device.txt" 2>&1

# GPU-marked tests: compiled Mosaic GPU kernels against their references.
timeout 270 "$PY" -m pytest -m gpu -q -p no:cacheprovider --benchmark-disable -rs \
  tests >"$OUT/gpu_tests.log" 2>&1
tests_rc=$?

# Benchmarks at full size, with the XLA path and peers in the same run.
timeout 200 "$PY" -m pallax.bench --size full --json "$OUT/bench.json" \
  --plot "$OUT/roofline.png" >"$OUT/bench.log" 2>&1
bench_rc=$?

# The GPU scheduler on a mocked 8-GPU topology: are dots bracketed by the
# ring's collective-permute-start/done pairs?
timeout 90 "$PY" -m pallax.bench.gpu_overlap --json "$OUT/gpu_overlap.json" \
  >"$OUT/gpu_overlap.log" 2>&1
overlap_rc=$?

cat >"$OUT/summary.json" <<JSON
{"tests_rc": $tests_rc, "bench_rc": $bench_rc, "overlap_rc": $overlap_rc,
 "seconds": $(( $(date +%s) - start ))}
JSON
tail -n 5 "$OUT/gpu_tests.log"
tail -n 40 "$OUT/bench.log"
cat "$OUT/gpu_overlap.json" 2>/dev/null
cat "$OUT/summary.json"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
