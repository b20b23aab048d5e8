#!/usr/bin/env bash
# Issue 27's run 3, where the time goes, in one call after the vLLM stash (as bench/gpu_headline.sh):
#   calls 1a, 1b, carry .vllm/c1, then .vllm/c2, each with .vllm/vllm_device_setup.sh:
#                                                     bash .vllm/vllm_device_setup.sh
#   call 2, carry .whl, .vllm/vllm_device_setup.sh:   bash bench/gpu_step_times.sh
# First native's step times on the headline workload, async on (bench/step_times_gpu.py: exposed host per decode
# step by bucket, replay time beside the weights' read, the largest bucket's replay by kernel) in $OUT/step_times.txt;
# then the kv_layout caliber (experiments/kv_layout.toml narrowed to native with CUDA graphs, the file's async
# default) beside vLLM 0.26.0 with CUDA graphs (its default), REPEATS per arm (default 1), in $OUT/kv_layout.txt,
# ledgers in $OUT/ledgers.tgz. NO_STEP_TIMES=1 skips the first part. RESUME=1 continues the kv_layout sweep from a
# carried .nova-ab.
source bench/gpu_setup.sh
install_vllm gpu_step_times.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader | tee $OUT/gpu.txt
if [ -z "$NO_STEP_TIMES" ]; then
    timeout 150 python3 bench/step_times_gpu.py experiments/headline.toml native --async on 2>&1 | head -60 \
        | tee $OUT/step_times.txt
fi
exp=experiments/gpu_kv_layout_vllm.toml
sed -e 's/^backend = \[.*\]/backend = ["native"]/' -e 's/^cuda_graphs = \[.*\]/cuda_graphs = [true]/' \
    -e 's/^baseline = .*/baseline = { peer = "vllm" }/' -e "/^\[sweep\]$/a repeats = ${REPEATS:-1}" \
    experiments/kv_layout.toml > $exp
# The peer takes the [engine] table's settings: kv_layout's leaves CUDA graphs off, which made vLLM run eager.
printf '\n[[sweep.peers]]\npeer = "vllm"\ncuda_graphs = true\n' >> $exp
timeout "${LIMIT:-400}" python3 -m novainfer.ab.sweep.cli sweep $exp ${RESUME:+--resume} 2>&1 | tail -30 \
    | tee $OUT/kv_layout.txt
find .nova-ab \( -name ledger.jsonl -o -name sweep.json -o -name '*.log' \) -path '*kv_layout*' \
    | tar czf $OUT/ledgers.tgz -T -
du -sh .cache/* 2>/dev/null | tee $OUT/caches.txt
pack_jit_cache
