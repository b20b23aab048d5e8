"""Teacher-forced logits on the GPU (bf16) against the CPU float32 reference, per backend.

The same random-weight model (same preset and seed: bitwise the same weights), the same token
sequences: prefill, then decode steps fed the same tokens. Prints the relative error
||gpu - cpu|| / ||cpu|| per backend and graph mode; the bar is 1e-2.

    python bench/check_logits_gpu.py [preset] [backend ...]
"""

from __future__ import annotations

import sys

import torch

from novainfer import LLM
from novainfer.ab.workload import teacher_forcing_inputs

PRESET = sys.argv[1] if len(sys.argv) > 1 else "deepseek-r1-distill-qwen-1.5b"
BACKENDS = sys.argv[2:] or ["native"]
SETTINGS = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=256, block_size=16, kv_cache_capacity=4096)


def main() -> None:
    model = f"random:{PRESET}"
    prompts, conts = teacher_forcing_inputs(seed=7, num_seqs=4, prompt_len=96, decode_steps=24, vocab_size=151936)
    torch.set_num_threads(16)
    reference = LLM(model, device="cpu", dtype="float32", **SETTINGS).teacher_forced_logits(prompts, conts)
    rows = []
    for backend in BACKENDS:
        for graphs in (False, True):
            llm = LLM(model, device="cuda", dtype="bfloat16", backend=backend, cuda_graphs=graphs, **SETTINGS)
            got = llm.teacher_forced_logits(prompts, conts)
            err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, reference))
            agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference))
            total = sum(r.shape[0] for r in reference)
            rows.append((backend, llm.graph_mode, err, f"{agree}/{total}"))
            del llm
            torch.cuda.empty_cache()
    print(f"{'backend':<12} {'mode':<40} {'rel err':>10}  argmax agree  (bar: 1e-2)")
    for backend, mode, err, agree in rows:
        print(f"{backend:<12} {mode:<40} {err:>10.2e}  {agree}  {'PASS' if err <= 1e-2 else 'FAIL'}")


if __name__ == "__main__":
    main()
