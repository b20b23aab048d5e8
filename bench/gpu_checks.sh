#!/usr/bin/env bash
# One device call for correctness on the GPU: the fused ops and native kernels' tests on CUDA, then the
# logits checks of native, flashinfer and cudnn, and cudnn's attention and start-up checks. Each part's
# tail lands in $OUT/<part>.txt. A carried .cache/fi_cache.tgz (flashinfer's JIT cache from an earlier
# machine) is unpacked first so flashinfer does not compile again.
source bench/gpu_setup.sh
if [ -f .cache/fi_cache.tgz ] && [ ! -d .cache/fi ]; then
    tar xzf .cache/fi_cache.tgz
    # Newer than the sources pip just installed, so ninja sees nothing to rebuild.
    find .cache/fi -exec touch {} +
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
part() {  # part NAME TIMEOUT COMMAND...: run with a time limit, keep the tail
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > $OUT/$name.log 2>&1
    echo "== $name: rc $? in $((SECONDS - start)) s" | tee -a $OUT/summary.txt
    tail -30 $OUT/$name.log >> $OUT/summary.txt
}
part tests 80 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_ops.py tests/test_triton_ops.py
part logits_native 140 python3 bench/check_logits_gpu.py deepseek-r1-distill-qwen-1.5b native
part flashinfer 180 python3 bench/check_flashinfer_gpu.py logits --configs default
part cudnn 180 python3 bench/check_cudnn_gpu.py attention logits start
