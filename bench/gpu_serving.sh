#!/usr/bin/env bash
# Issue 27's online run (experiments/serving.toml: native with the asynchronous host path against vLLM 0.26.0 at
# 8..64 req/s, SLO TTFT <= 500 ms / TPOT <= 30 ms, 2 repeats), over as many device calls as it takes, each two
# back to back as bench/gpu_headline.sh's (the machine keeps /tmp for 30 s between them):
#   calls 1a, 1b, carry .vllm/c1, then .vllm/c2, each with .vllm/vllm_device_setup.sh:
#                                                             bash .vllm/vllm_device_setup.sh   (stash the bundle)
#   call 2, carry .whl, .vllm/vllm_device_setup.sh (and .nova-ab after the first):  [RESUME=1] bash bench/gpu_serving.sh
# Bring $OUT/ledgers.tgz home and unpack it in the repository before the next call; or, to keep the machine warm
# (and vLLM's Triton, torch.compile and flashinfer caches under .cache/ with it), call again at once with RESUME=1
# and no .nova-ab carried: a warm machine keeps the ignored .nova-ab/ and .cache/ and /tmp from the call before
# (bench/RESULTS.md, 2026-12-02 sixth session: the prefix run resumed so), and every call returns the ledgers.
# The table and the verdict land in $OUT/serving.txt, the latency-against-rate plot in $OUT/serving.png.
source bench/gpu_setup.sh
install_vllm gpu_serving.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader | tee $OUT/gpu.txt
timeout "${LIMIT:-540}" python3 -m novainfer.ab.sweep.cli sweep experiments/serving.toml ${RESUME:+--resume} 2>&1 \
    | tail -60 | tee $OUT/serving.txt
latest=$(ls -td .nova-ab/serving-* 2>/dev/null | head -1)
[ -n "$latest" ] && [ -f "$latest/compare.png" ] && cp "$latest/compare.png" $OUT/serving.png
find .nova-ab \( -name ledger.jsonl -o -name sweep.json -o -name '*.log' \) | tar czf $OUT/ledgers.tgz -T -
du -sh .cache/* 2>/dev/null | tee $OUT/caches.txt  # what a carried JIT cache would weigh
pack_jit_cache
