#!/usr/bin/env bash
# Issue 28 on nvidia-h200-x2: experiments/ray_x2.toml (the headline caliber, native and cudnn, 4 repeats) through
# `--executor ray` on both GPUs, a driver killed mid-sweep and resumed, and the same file on one GPU with the
# local executor. Carry .whl and .ray (bench/carries.sh; 53 MB, one call), and .nova-ab from the second call on
# (unpack $OUT/ledgers.tgz here after each call). PARTS picks what a call runs, in this order:
#   PARTS="ray kill" bash bench/gpu_ray.sh          the Ray sweep (~6 min), then the kill and resume (~2 min)
#   PARTS=local [RESUME=1] bash bench/gpu_ray.sh    the local sweep on GPU 0 (8 trials of ~75 s: two calls)
# Each part's sweep runs within LIMIT seconds (default 540). The driver's wall time of each run goes to
# .nova-ab/walls.txt; `python3 bench/ray_x2_report.py` reads it with the ledgers (here or at home).
# EXP names another experiment file (a CPU caliber rehearses the script on a CPU machine: GPUS=0).
export NOVA_WHEELS=${NOVA_WHEELS:-.whl .ray}
source bench/gpu_setup.sh
exp=${EXP:-experiments/ray_x2.toml}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0  # a cluster on loopback, for one call
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
nvidia-smi --query-gpu=index,name,uuid,driver_version,power.limit --format=csv,noheader | tee $OUT/gpu.txt
mkdir -p .nova-ab
ray() { python3 -m ray.scripts.scripts "$@"; }  # the carry holds Ray's files, not its console script

# One sweep of FILE with ARGS, timed by the driver's clock into walls.txt: "<sweep dir> <seconds> <rc> <what>".
timed_sweep() {
    local what=$1 file=$2
    shift 2
    local started rc latest
    started=$EPOCHREALTIME
    timeout "${LIMIT:-540}" python3 -m novainfer.ab.sweep.cli sweep "$file" "$@" > $OUT/$what.txt 2>&1
    rc=$?
    latest=$(dirname "$(ls -t .nova-ab/*/ledger.jsonl | head -1)")  # the sweep that just wrote its ledger
    echo "$(basename "$latest") $(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $started }") $rc $what" | tee -a .nova-ab/walls.txt
    tail -25 $OUT/$what.txt
}

start_head() {
    ray start --head --num-gpus="$gpus" --port=0 --include-dashboard=false --disable-usage-stats > $OUT/ray_head.txt 2>&1
    export RAY_ADDRESS
    RAY_ADDRESS=$(sed -n "s/.*ray start --address='\([^']*\)'.*/\1/p" $OUT/ray_head.txt | head -1)
    echo "ray head: $RAY_ADDRESS, $gpus GPUs"
}

for part in ${PARTS:-ray kill}; do
    case $part in
        ray)  # no RAY_ADDRESS: the driver starts Ray on this machine's GPUs and stops it, within its wall time
            unset RAY_ADDRESS
            timed_sweep ray "$exp" --executor ray ${RESUME:+--resume} ;;
        kill)  # a short caliber of the same arms on a cluster of its own, which outlives the killed driver
            start_head
            sed -e 's/^name = "ray_x2"/name = "ray_x2_kill"/' -e 's/^num_seqs = .*/num_seqs = 32/' \
                -e 's/^output_len = .*/output_len = [16, 64]/' "$exp" > experiments/gpu_ray_kill.toml
            python3 -m novainfer.ab.sweep.cli sweep experiments/gpu_ray_kill.toml --executor ray > $OUT/kill.txt 2>&1 &
            driver=$!
            until [ "$(cat .nova-ab/ray_x2_kill-*/ledger.jsonl 2>/dev/null | wc -l)" -ge 1 ] \
                || ! kill -0 $driver 2> /dev/null; do sleep 1; done
            kill -9 $driver && echo "driver killed with $(cat .nova-ab/ray_x2_kill-*/ledger.jsonl | wc -l) records"
            wait $driver 2> /dev/null
            timed_sweep resumed experiments/gpu_ray_kill.toml --executor ray --resume ;;
        local)
            CUDA_VISIBLE_DEVICES=0 timed_sweep local "$exp" --executor local ${RESUME:+--resume} ;;
    esac
done
[ -n "$RAY_ADDRESS" ] && ray stop --force > /dev/null 2>&1
python3 bench/ray_x2_report.py | tee $OUT/report.txt
find .nova-ab \( -name ledger.jsonl -o -name sweep.json -o -name walls.txt -o -name '*.log' \) \
    | tar czf $OUT/ledgers.tgz -T -
