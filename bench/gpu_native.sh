#!/usr/bin/env bash
# One device call: logits check, then the two calibers' sweeps (native; other backends skip unless
# their plugins and libraries are installed). Results land in $OUT.
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 bench/check_logits_gpu.py deepseek-r1-distill-qwen-1.5b native 2>&1 | tee $OUT/check_logits.txt
python3 -m novainfer.ab.cli sweep experiments/kv_layout.toml 2>&1 | tee $OUT/kv_layout.txt
python3 -m novainfer.ab.cli sweep experiments/grid.toml 2>&1 | tee $OUT/grid.txt
tar czf $OUT/nova-ab.tgz .nova-ab
