#!/usr/bin/env bash
# Prefix caching on the device. Ours alone, one call with .whl:
#   NO_PEERS=1 BACKENDS='"native"' bash bench/gpu_prefix.sh
# With the vLLM arm, calls back to back as bench/gpu_headline.sh's (`bash .vllm/vllm_device_setup.sh` carrying
# .vllm/c1, then .vllm/c2, then this script carrying .whl and .vllm/vllm_device_setup.sh): vLLM is installed when
# that file is here.
# experiments/prefix.toml (8 groups sharing a 1024-token system prompt; prefix cache off and on, native and
# flashinfer, vLLM with its cache on), REPEATS per arm (default: the file's), within LIMIT seconds (default
# 540); a later call with RESUME=1 continues from the ledger. Table in $OUT/prefix.txt, ledgers in
# $OUT/ledgers.tgz.
source bench/gpu_setup.sh
if [ -e .vllm/vllm_device_setup.sh ]; then
    bash .vllm/vllm_device_setup.sh install && export PYTHONPATH=$PYTHONPATH:/tmp/vsite
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
# REPEATS, BACKENDS ('"native"') and NO_PEERS=1 (no vLLM arm) narrow the file for a short call.
exp=experiments/gpu_prefix.toml
narrow=(-e '')
[ -n "$BACKENDS" ] && narrow+=(-e "s/^backend = \[.*\]/backend = [$BACKENDS]/")
[ -n "$REPEATS" ] && narrow+=(-e "s/^repeats = .*/repeats = $REPEATS/")
[ -n "$NO_PEERS" ] && narrow+=(-e '/^\[\[sweep.peers\]\]/,$d')
sed "${narrow[@]}" experiments/prefix.toml > $exp
timeout "${LIMIT:-540}" python3 -m novainfer.ab.sweep.cli sweep $exp ${RESUME:+--resume} 2>&1 | tail -40 \
    | tee $OUT/prefix.txt
find .nova-ab \( -name ledger.jsonl -o -name sweep.json \) | tar czf $OUT/ledgers.tgz -T -
