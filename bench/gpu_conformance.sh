#!/usr/bin/env bash
# Issue 27's first run, one device call per carry set:
#   bash bench/gpu_conformance.sh                                         # carry .whl: native, cudnn, flashinfer
#   NOVA_WHEELS=.fa4 BACKENDS=flashattn CHECKS=flashattn bash bench/gpu_conformance.sh   # carry .fa4
# The conformance kit for each backend (bench/conformance_gpu.py), then the bench checks the kit replaced
# (bench/check_<backend>_gpu.py, which now lay their steps out through novainfer.testing; PARTS, default the
# attention part), to compare with their earlier numbers in bench/RESULTS.md. Tails in $OUT/<part>.txt, a
# summary in $OUT/summary.txt.
source bench/gpu_setup.sh
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader | tee $OUT/gpu.txt
part() {  # part NAME TIMEOUT COMMAND...: run with a time limit, keep the tail
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > $OUT/$name.log 2>&1
    echo "== $name: rc $? in $((SECONDS - start)) s" | tee -a $OUT/summary.txt
    tail -${TAIL:-40} $OUT/$name.log > $OUT/$name.txt
}
cd bench
part conformance "${KIT_LIMIT:-240}" python3 conformance_gpu.py ${BACKENDS:-native cudnn flashinfer}
for check in ${CHECKS:-cudnn flashinfer}; do
    # flashinfer's default configuration only: each other one JIT-compiles modules of its own (minutes).
    part "check_$check" "${CHECK_LIMIT:-120}" python3 "check_${check}_gpu.py" ${PARTS:-attention} \
        $([ "$check" = flashinfer ] && echo --configs default)
done
cat $OUT/conformance.txt | tail -30
grep -h -E "PASS, .* FAIL" $OUT/check_*.txt
