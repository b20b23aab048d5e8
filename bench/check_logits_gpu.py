"""Teacher-forced logits on the GPU against the CPU float32 reference, per backend and precision.

The same random-weight model (same preset and seed: bitwise the same, bfloat16-exact weights), the
same token sequences: prefill, then decode steps fed the same tokens. Prints the relative error
||got - ref|| / ||ref|| of each engine against the CPU float32 one, and last the gate's own
comparison (float32 model, attention in bfloat16: backend against native's PyTorch path). The
first row is the floor: PyTorch itself in bfloat16 on the CPU, which no bfloat16 engine can beat.

    python bench/check_logits_gpu.py [preset] [backend ...]
"""

from __future__ import annotations

import sys

import torch

from novainfer import LLM
from novainfer.ab.workload import teacher_forcing_inputs
from novainfer.models.qwen2 import build_model

PRESET = sys.argv[1] if len(sys.argv) > 1 else "deepseek-r1-distill-qwen-1.5b"
BACKENDS = sys.argv[2:] or ["native"]
SETTINGS = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=512, block_size=16, kv_cache_capacity=4096)
TORCH = {"kernels": "torch"}


def relative_errors(got: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[float, str]:
    err = max(float((g - r).norm() / r.norm()) for g, r in zip(got, ref))
    agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, ref))
    return err, f"{agree}/{sum(r.shape[0] for r in ref)}"


def main() -> None:
    model = f"random:{PRESET}"
    torch.set_num_threads(16)
    cpu32 = build_model(model, 0, torch.float32, torch.device("cpu"), SETTINGS["max_model_len"])
    prompts, conts = teacher_forcing_inputs(
        seed=7, num_seqs=4, prompt_len=96, decode_steps=24, vocab_size=cpu32.config.vocab_size
    )

    def logits(device: str, dtype: str, shared: torch.nn.Module, **settings: object) -> tuple[list, str]:
        llm = LLM(model, device=device, dtype=dtype, shared_model=shared, **SETTINGS, **settings)
        out = llm.teacher_forced_logits(prompts, conts)
        mode = llm.graph_mode
        del llm
        torch.cuda.empty_cache()
        return out, mode

    reference, _ = logits("cpu", "float32", cpu32, backend_options=TORCH)
    floor, _ = logits("cpu", "bfloat16", cpu32.to(torch.bfloat16), backend_options=TORCH)
    rows = [("cpu bf16 torch (floor)", "eager", *relative_errors(floor, reference))]
    del cpu32
    gpu16 = build_model(model, 0, torch.bfloat16, torch.device("cuda"), SETTINGS["max_model_len"])
    gpu32 = build_model(model, 0, torch.float32, torch.device("cuda"), SETTINGS["max_model_len"])
    gate_ref, _ = logits("cuda", "float32", gpu32, kv_cache_dtype="bfloat16", backend_options=TORCH)
    gate_rows = []
    for backend in BACKENDS:
        for graphs in (False, True):
            try:
                got, mode = logits("cuda", "bfloat16", gpu16, backend=backend, cuda_graphs=graphs)
                rows.append((f"gpu bf16 {backend}", mode, *relative_errors(got, reference)))
                got, mode = logits(
                    "cuda", "float32", gpu32, backend=backend, cuda_graphs=graphs, kv_cache_dtype="bfloat16"
                )
                rows.append((f"gpu fp32+bf16 attn {backend}", mode, *relative_errors(got, reference)))
                gate_rows.append((f"gate {backend} vs native torch", mode, *relative_errors(got, gate_ref)))
            except Exception as error:  # one failing backend must not hide the others
                rows.append((f"{backend} cuda_graphs={graphs}", f"ERROR {type(error).__name__}: {error}"[:60], 0.0, ""))
    print(f"{'engine vs cpu fp32':<34} {'mode':<28} {'rel err':>9}  argmax  (bar: 1e-2)")
    for name, mode, err, agree in rows + gate_rows:
        print(f"{name:<34} {mode:<28} {err:>9.2e}  {agree}  {'PASS' if err <= 1e-2 else 'FAIL'}")


if __name__ == "__main__":
    main()
