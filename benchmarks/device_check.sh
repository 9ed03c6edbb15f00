#!/usr/bin/env bash
# One run on a lent GPU machine (issue 7): install the carried wheels (.whl: transformers 5.24 and
# guardrail's other missing dependencies) and guardrail itself, run the benchmark on the GPU, then
# the shared-prefix equality tests on the GPU. Everything it writes lands in $OUT.
#   locally, without a GPU:  SKIP_INSTALL=1 PY=.venv/bin/python DEVICE=cpu OUT=/tmp/dev benchmarks/device_check.sh
set -uo pipefail
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true; uptime; nproc; } | tee "$OUT/machine.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/machine.txt"
timeout "${BENCH_TIMEOUT:-240}" $PY -m guardrail.evaluation.benchmark --device "$DEVICE" --rounds "${ROUNDS:-9}" --out "$OUT/bench-$DEVICE-llava.json" --profile "$OUT/prof" 2>&1 | tee "$OUT/bench.log"
GUARDRAIL_TEST_DEVICE=$DEVICE timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_prefix_cache.py 2>&1 | tee "$OUT/tests.log" | tail -20
