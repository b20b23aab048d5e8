#!/usr/bin/env bash
# Issue 23's GPU measurement in one device call (carry .whl and .vllm, see ../shared/peers/vllm-0.26.0/README):
#   bash bench/gpu_async.sh
# The headline caliber with asynchronous scheduling off and on beside vLLM 0.26.0 (experiments/async.toml,
# REPEATS per arm, default 2), then the step times by class (host work per step and the share hidden behind
# the GPU) with it on and off. Tables in $OUT/async.txt and $OUT/step_times_{on,off}.txt, ledgers in
# $OUT/ledgers.tgz.
source bench/gpu_setup.sh
if [ -e .vllm/vllm_device_setup.sh ]; then
    bash .vllm/vllm_device_setup.sh install && export PYTHONPATH=$PYTHONPATH:/tmp/vsite
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
# NO_PEERS=1 leaves the vLLM arm out (a call too short for its start-up).
sed -e "s/^repeats = .*/repeats = ${REPEATS:-2}/" ${NO_PEERS:+-e '/^\[\[sweep.peers\]\]/,$d'} experiments/async.toml \
    > experiments/gpu_async.toml
timeout "${LIMIT:-420}" python3 -m novainfer.ab.sweep.cli sweep experiments/gpu_async.toml 2>&1 | tail -30 | tee $OUT/async.txt
for mode in off on; do
    timeout 120 python3 bench/step_times_gpu.py experiments/grid.toml native --async $mode 2>&1 | head -12 \
        | tee $OUT/step_times_$mode.txt
done
find .nova-ab \( -name ledger.jsonl -o -name sweep.json \) | tar czf $OUT/ledgers.tgz -T -
