#!/usr/bin/env bash
# The online caliber on the device, one call (of at most LIMIT seconds, default 540):
#   NOVA_WHEELS=".whl .fi" bash bench/gpu_serving.sh
# runs experiments/serving.toml (latency under load at 8..64 req/s, SLO TTFT <= 500 ms / TPOT <= 30 ms); its
# 16 trials take more than one call, so a later call with RESUME=1 continues the sweep from its ledger (carry
# .nova-ab back: the ledgers come home in $OUT/ledgers.tgz, `nova-ab import` logs them to MLflow). The table and
# the verdict land in $OUT/serving.txt, the latency-against-rate plot in $OUT/serving.png.
source bench/gpu_setup.sh
export FLASHINFER_WORKSPACE_BASE=$PWD/.cache/fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
timeout "${LIMIT:-540}" python3 -m novainfer.ab.sweep.cli sweep experiments/serving.toml ${RESUME:+--resume} 2>&1 \
    | tail -60 | tee $OUT/serving.txt
latest=$(ls -td .nova-ab/serving-* 2>/dev/null | head -1)
[ -n "$latest" ] && [ -f "$latest/compare.png" ] && cp "$latest/compare.png" $OUT/serving.png
find .nova-ab \( -name ledger.jsonl -o -name sweep.json \) | tar czf $OUT/ledgers.tgz -T -
