#!/usr/bin/env bash
# The verdict checks of one device call, as bench/RESULTS.md records them:
#   BACKENDS='"native","cudnn","flashinfer"' REPEATS=1 bash bench/gpu_verdicts.sh     # carry .whl
# First the graph-only adversary (tests/plugins/adversarial "wrong-in-graphs") against native on a tiny model
# (SKIP_ADVERSARY=1 skips it), then the headline caliber (experiments/grid.toml) narrowed to BACKENDS with
# REPEATS repeats, within LIMIT seconds. Ledgers, sweep.json and trial logs land in $OUT/ledgers.tgz; the
# verdicts, gate coverage, the output check (tokens checked, margin in bfloat16, its cost beside the timed run)
# and phase breakdown per step class print last (bench/verdict_report.py). The headline's output check:
#   BACKENDS='"native"' REPEATS=1 SKIP_ADVERSARY=1 bash bench/gpu_verdicts.sh
# (each trial's output check runs in its own process after the trial's: budget LIMIT for both).
source bench/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site \
    tests/plugins/adversarial
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
if [ -z "$SKIP_ADVERSARY" ]; then
    timeout 200 python3 -m novainfer.ab.sweep.cli sweep bench/graph_adversary.toml > $OUT/adversary.txt 2>&1
fi
sed -e "s/^backend = \[.*\]/backend = [${BACKENDS:-\"native\",\"cudnn\",\"flashinfer\"}]/" \
    -e "/^\[sweep\]$/a repeats = ${REPEATS:-1}" experiments/grid.toml > experiments/gpu_grid.toml
timeout "${LIMIT:-380}" python3 -m novainfer.ab.sweep.cli sweep experiments/gpu_grid.toml > $OUT/grid.txt 2>&1
find .nova-ab \( -name ledger.jsonl -o -name sweep.json -o -name '*.log' \) | tar czf $OUT/ledgers.tgz -T -
tail -4 $OUT/grid.txt
python3 bench/verdict_report.py $(ls .nova-ab/*/ledger.jsonl) --classes
