"""What the bench/check_*_gpu.py scripts share: result rows, the guarded runner and its table, and the
teacher-forced logits references every backend's whole-model check is measured against.

The logits references are the two comparisons bench/check_logits_gpu.py and the sweep's gate make:
    "bf16": the whole model in bfloat16 against the CPU float32 engine. bfloat16 alone is ~3e-2 off
        float32 on this random model (bench/RESULTS.md, "Correctness on the GPU"), so the bar is
        FLOOR_SLACK times native's PyTorch path in bfloat16 (the floor), at least MAX_REL_ERROR.
    "gate": float32 weights with attention over a bfloat16 cache, against native's PyTorch path in the
        same setting (so only the attention backend differs), held to MAX_REL_ERROR.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from novainfer import LLM
from novainfer.ab.workload import teacher_forcing_inputs
from novainfer.models.qwen2 import Qwen2ForCausalLM, build_model

MAX_REL_ERROR = 1e-2
FLOOR_SLACK = 1.25
LOGITS_PRESET = "deepseek-r1-distill-qwen-1.5b"
TORCH = {"kernels": "torch"}  # native's PyTorch path: the reference backend


@dataclass
class Row:
    part: str
    case: str
    config: str = ""
    max_abs: float = math.nan
    rel: float = math.nan
    note: str = ""
    ok: bool = False


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def guarded(row: Row, run: Callable[[], Row]) -> Row:
    """Run one case; an exception fails that case only and is printed in full."""
    try:
        row = run()
    except Exception as error:  # one failing case must not hide the others
        traceback.print_exc()
        row.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    print(f"{row.part:<9} {row.case:<38} {row.config:<13} rel {row.rel:.2e} {'PASS' if row.ok else 'FAIL'}  "
          f"{row.note}", flush=True)
    return row


def print_table(rows: list[Row]) -> None:
    """The rows again, one line each, then the count: what a device call's output tail shows."""
    print(f"\n{'part':<9} {'case':<38} {'config':<13} {'max abs':>9} {'rel err':>9}  result  "
          f"(bar: rel <= {MAX_REL_ERROR})")
    for row in rows:
        print(f"{row.part:<9} {row.case:<38} {row.config:<13} {row.max_abs:>9.2e} {row.rel:>9.2e}  "
              f"{'PASS' if row.ok else 'FAIL'}  {row.note[:120]}")
    failed = sum(not row.ok for row in rows)
    print(f"{len(rows) - failed} PASS, {failed} FAIL")


@dataclass
class LogitsReferences:
    """The teacher-forcing inputs, the models the compared engines share, and each kind's expected logits and bar."""

    model: str
    device: str
    settings: dict[str, Any]
    prompts: list[list[int]]
    continuations: list[list[int]]
    models: dict[str, tuple[Qwen2ForCausalLM, dict[str, str]]]  # kind -> (shared weights, dtype settings)
    expected: dict[str, list[torch.Tensor]]
    bars: dict[str, float]

    def engine(self, kind: str, backend: str, options: dict[str, Any], cuda_graphs: bool) -> dict[str, Any]:
        """LLM keyword arguments for one compared engine of `kind` ("bf16" or "gate")."""
        shared, dtypes = self.models[kind]
        return dict(model=self.model, device=self.device, backend=backend, backend_options=options,
                    cuda_graphs=cuda_graphs, shared_model=shared, **dtypes, **self.settings)


def logits_references(block_size: int = 16, preset: str = LOGITS_PRESET, device: str = "cuda") -> LogitsReferences:
    """Compute both kinds' expected logits (chunked prefill, 6 sequences so decode graphs pad) and bars."""
    model = f"random:{preset}"
    settings = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, block_size=block_size,
                    kv_cache_capacity=4096)
    torch.set_num_threads(16)
    cpu32 = build_model(model, 0, torch.float32, torch.device("cpu"), settings["max_model_len"])
    prompts, conts = teacher_forcing_inputs(
        seed=7, num_seqs=6, prompt_len=96, decode_steps=24, vocab_size=cpu32.config.vocab_size
    )
    reference = LLM(model, device="cpu", dtype="float32", shared_model=cpu32, **settings)
    expected = {"bf16": reference.teacher_forced_logits(prompts, conts)}
    del reference, cpu32
    target = torch.device(device)
    models = {
        "bf16": (build_model(model, 0, torch.bfloat16, target, settings["max_model_len"]), {"dtype": "bfloat16"}),
        "gate": (build_model(model, 0, torch.float32, target, settings["max_model_len"]),
                 {"dtype": "float32", "kv_cache_dtype": "bfloat16"}),
    }
    refs = LogitsReferences(model, device, settings, prompts, conts, models, expected, {})
    native = {kind: LLM(**refs.engine(kind, "native", TORCH, False)).teacher_forced_logits(prompts, conts)
              for kind in models}
    expected["gate"] = native["gate"]
    floor = max(relative_error(g, e) for g, e in zip(native["bf16"], expected["bf16"]))
    refs.bars.update(bf16=max(MAX_REL_ERROR, FLOOR_SLACK * floor), gate=MAX_REL_ERROR)
    print(f"bfloat16 floor (native PyTorch path vs CPU float32): {floor:.2e}; bf16 bar {refs.bars['bf16']:.2e}")
    return refs


def teacher_forced(row: Row, refs: LogitsReferences, kind: str, engine: dict[str, Any]
                   ) -> tuple[LLM, dict[str, int], dict[str, int]]:
    """Run `engine` under teacher forcing and fill the row's errors and note; the caller sets `row.ok`
    from them and from what is returned: the engine and its backend counters before and after the run."""
    llm = LLM(**engine)
    before = llm.backend_counters()
    got = llm.teacher_forced_logits(refs.prompts, refs.continuations)
    after = llm.backend_counters()
    expected = refs.expected[kind]
    row.rel = max(relative_error(g, e) for g, e in zip(got, expected))
    row.max_abs = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    agree = sum(int((g.argmax(-1) == e.argmax(-1)).sum()) for g, e in zip(got, expected))
    row.note = f"{llm.graph_mode}; argmax {agree}/{sum(e.shape[0] for e in expected)}"
    return llm, before, after


def counters_moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that changed while running: compiles or graph builds after the engine was built."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
