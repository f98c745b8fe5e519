#!/usr/bin/env bash
# One GPU session: tune the Triton kernels (writes the table the heuristics read), then measure what users
# get with it. Everything lands in $OUT (a tarball of both runs plus the logs).
#   OUT=/some/dir bash benchmarks/gpu_session.sh [tune budget s] [check budget s]
# Liger-Kernel, when wheels are in .whl/, is installed to /tmp/site first (no network needed).
set -uo pipefail
OUT=${OUT:?set OUT}
TUNE_BUDGET=${1:-230}
CHECK_BUDGET=${2:-230}
export PYTHONUNBUFFERED=1 PYTHONPATH=src
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
WORK=$(mktemp -d)
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv; date -u; \
  git log -1 --format='commit %h %s' 2>/dev/null; } | tee "$OUT/session.txt"
# the C++ library the GPU eager entry launches from, built on the CPUs while the tuner holds the GPU
python3 -m rmsnorm build > "$OUT/build-log.txt" 2>&1 &
BUILD=$!
python3 benchmarks/gpu_tune.py --out "$WORK/tune" --budget "$TUNE_BUDGET" --stall 60 \
  --table src/rmsnorm/backends/triton/tuned.json 2>&1 | tee "$OUT/tune-log.txt"
cp src/rmsnorm/backends/triton/tuned.json "$OUT/tuned.json" 2>/dev/null
wait $BUILD
python3 benchmarks/gpu_check.py --out "$WORK/check" --budget "$CHECK_BUDGET" 2>&1 | tee "$OUT/check-log.txt"
# gated and grouped rows on the Triton kernels against the Hugging Face modules (short)
timeout 60 python3 benchmarks/gated.py --device cuda 2>&1 | tee "$OUT/gated.txt"
tar czf "$OUT/runs.tgz" -C "$WORK" .
