#!/usr/bin/env bash
# Issue 27's headline (experiments/headline.toml: native with the asynchronous host path on and off, cudnn,
# flashinfer, vLLM 0.26.0; 3 repeats), over as many device calls as it takes. Every call needs every arm
# installed (an arm missing from a call is recorded as skipped, which only RERUN_FAILED=1 runs again),
# and .whl with .vllm is more than one call carries, so each call is two back to back (the machine keeps /tmp
# for 30 s between them):
#   calls 1a, 1b, carry .vllm/c1, then .vllm/c2, each with .vllm/vllm_device_setup.sh:
#                                            bash .vllm/vllm_device_setup.sh          (stash the bundle in /tmp)
#   call 2, carry .whl, .vllm/vllm_device_setup.sh (and .nova-ab after the first): [RESUME=1] bash bench/gpu_headline.sh
# Bring $OUT/ledgers.tgz home and unpack it in the repository before the next call (it holds .nova-ab/), so that
# RESUME=1 runs only the trials still missing (RERUN_FAILED=1: also those that failed, timed out or were
# skipped). The table lands in $OUT/headline.txt, the trials' logs beside the ledger. With STEP_TIMES=1 the
# call ends with native's step times by class, async on (bench/step_times_gpu.py). NO_VLLM=1, once every vLLM
# trial has its record, makes it one call with .whl alone (no stash; an arm it would run is recorded as skipped).
source bench/gpu_setup.sh
[ -z "$NO_VLLM" ] && install_vllm gpu_headline.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader | tee $OUT/gpu.txt
timeout "${LIMIT:-480}" python3 -m novainfer.ab.sweep.cli sweep experiments/headline.toml ${RESUME:+--resume} \
    ${RERUN_FAILED:+--rerun-failed} 2>&1 \
    | tail -40 | tee $OUT/headline.txt
if [ -n "$STEP_TIMES" ]; then
    timeout 120 python3 bench/step_times_gpu.py experiments/headline.toml native --async on 2>&1 | head -60 \
        | tee $OUT/step_times.txt
fi
find .nova-ab \( -name ledger.jsonl -o -name sweep.json -o -name '*.log' \) | tar czf $OUT/ledgers.tgz -T -
du -sh .cache/* 2>/dev/null | tee $OUT/caches.txt  # what a carried JIT cache would weigh
