#!/usr/bin/env bash
# One device call of sweeps, as bench/RESULTS.md records them:
#   CALIBERS="grid kv_layout" BACKENDS='"native","cudnn"' REPEATS=3 bash bench/gpu_sweeps.sh
# Each experiments/<caliber>.toml is run with its backend axis narrowed to BACKENDS (default: the file's)
# and REPEATS repeats per arm (default 3), within LIMIT seconds (default 540) each. The console tables
# land in $OUT/<caliber>.txt, the ledgers (with their sweep.json) in $OUT/ledgers.tgz (`nova-ab import` logs them to MLflow).
source bench/gpu_setup.sh
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
for name in ${CALIBERS:-grid kv_layout}; do
    narrow=()
    [ -n "$BACKENDS" ] && narrow=(-e "s/^backend = \[.*\]/backend = [$BACKENDS]/")
    sed "${narrow[@]}" -e "/^\[sweep\]$/a repeats = ${REPEATS:-3}" experiments/$name.toml > experiments/gpu_$name.toml
    timeout "${LIMIT:-540}" python3 -m novainfer.ab.sweep.cli sweep experiments/gpu_$name.toml 2>&1 | tail -30 | tee $OUT/$name.txt
done
find .nova-ab \( -name ledger.jsonl -o -name sweep.json \) | tar czf $OUT/ledgers.tgz -T -
