"""The check of a timed run's own tokens: honest outputs pass in every dtype, one wrong token is named, the margin is
the floor's measured rounding, and the checking process runs the core's reference with no backend plugin loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from novainfer import LLM, SamplingParams
from novainfer.ab.trial import output_check
from novainfer.ab.trial.output_check import check_outputs, logits_budget
from novainfer.ab.wire import OutputCheck
from novainfer.ab.workload import Workload
from novainfer.backend_api import CONTRACT_VERSION, BackendError, BackendSpec, Capabilities, hookimpl
from novainfer.config import EngineConfig
from novainfer.models.qwen2 import build_model, in_dtype
from novainfer.plugins import discover_backends, select_backend

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = Workload(num_seqs=8, input_len=(16, 64), output_len=(8, 32), seed=0)
SETTINGS = dict(
    model="random:qwen2-tiny-wide", device="cpu", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
    kv_cache_capacity=1024,
)


def honest_run(dtype: str, token_seed: int = 3) -> tuple[EngineConfig, list[list[int]], list[list[int]]]:
    config = EngineConfig(backend="native", dtype=dtype, **SETTINGS)
    prompts = WORKLOAD.prompts(token_seed)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in WORKLOAD.output_lens()]
    outputs = [o.token_ids for o in LLM(**config.to_dict()).generate(prompts, params)]
    return config, prompts, outputs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_honest_run_passes_with_every_token_checked_within_its_floor(dtype: str) -> None:
    config, prompts, outputs = honest_run(dtype)
    report = check_outputs(config, prompts, outputs, floor_margin=2.0)
    assert report.passed() and report.complete(), report.problem()
    assert report.tokens_checked == report.tokens_produced == WORKLOAD.expected_output_tokens
    assert report.tokens_outside == 0 and report.worst_ratio <= 1
    assert 0 < report.build_seconds < report.seconds and report.steps >= 1  # where the check's time went
    # The margin is measured, not set: four times the floor's largest logit difference, which bfloat16's
    # rounding makes far larger than float32's.
    assert report.floor_delta > 0 and report.margin == pytest.approx(4 * report.floor_delta)
    assert (report.floor_delta > 1e-2) is (dtype == "bfloat16")


def test_one_wrong_token_is_outside_and_named_by_request_and_position() -> None:
    config, prompts, outputs = honest_run("float32")
    request = 5
    last = len(outputs[request]) - 1
    # The reference's least likely token at that position: far outside any rounding.
    reference = LLM(**{**config.to_dict(), "backend": "reference"}, warm_up=False)
    (logits,) = reference.teacher_forced_logits([prompts[request]], [outputs[request]])
    outputs[request][last] = int(logits[last].argmin())
    report = check_outputs(config, prompts, outputs, floor_margin=2.0)
    assert not report.passed()
    assert report.tokens_outside == 1 and report.tokens_checked == WORKLOAD.expected_output_tokens
    assert (report.worst_request, report.worst_position) == (request, last)
    assert report.worst_gap > 100 * report.margin
    assert f"request {request}, output token {last}" in report.problem()


def test_the_step_size_changes_how_long_the_check_takes_never_what_it_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The logits budget sets how many tokens a step of the check holds (more on a GPU with room, for speed): every
    token is still checked once, and the same wrong token is found, whether it takes one step or many."""
    config, prompts, outputs = honest_run("float32")
    request = 6
    position = len(outputs[request]) - 1  # the last: no later token sees it
    reference = LLM(**{**config.to_dict(), "backend": "reference"}, warm_up=False)
    (logits,) = reference.teacher_forced_logits([prompts[request]], [outputs[request]])
    outputs[request][position] = int(logits[position].argmin())
    reports = [check_outputs(config, prompts, outputs, floor_margin=2.0)]
    vocab = reference.model_config.vocab_size
    monkeypatch.setattr(output_check, "LOGITS_ELEMENTS", vocab * config.block_size)  # one block's tokens a step
    reports.append(check_outputs(config, prompts, outputs, floor_margin=2.0))
    whole, small = reports
    assert small.steps > 4 * whole.steps
    for report in reports:
        assert report.tokens_checked == report.tokens_produced == WORKLOAD.expected_output_tokens
        assert report.tokens_outside == 1 and (report.worst_request, report.worst_position) == (request, position)


def test_a_gpu_with_room_gets_larger_steps_within_bounds() -> None:
    gib = 1 << 30
    assert logits_budget(None) == output_check.LOGITS_ELEMENTS  # the host's memory is not asked
    assert logits_budget(1 * gib) == output_check.LOGITS_ELEMENTS  # little free: never below the floor
    assert logits_budget(16 * gib) == 16 * gib // 64  # three logits-sized tensors within a fifth of it
    assert logits_budget(130 * gib) == output_check.LOGITS_ELEMENTS_GPU  # an empty H200: the cap


def test_the_report_travels_as_json_with_a_nan_failing() -> None:
    report = OutputCheck(tokens_produced=3, tokens_checked=3, worst_ratio=float("nan"))
    again = OutputCheck.from_json(report.to_json())
    assert again.tokens_checked == 3 and not again.passed()


def test_the_checking_process_loads_no_backend_plugin(pip_install: Callable[[Path], Path]) -> None:
    """The adversarial plugin installed where the process would find it: the check still runs the core's
    reference alone, and says which plugin modules it saw (none)."""
    site = pip_install(ROOT / "tests" / "plugins" / "adversarial")
    config, prompts, outputs = honest_run("float32")
    payload = {"config": config.to_dict(), "prompts": prompts, "outputs": outputs, "floor_margin": 2.0}
    done = subprocess.run(
        [sys.executable, "-m", "novainfer.ab.trial.output_check"], input=json.dumps(payload), capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=300, check=True,
    )
    report = OutputCheck.from_json(done.stdout.strip().splitlines()[-1])
    assert report.passed() and report.plugins_loaded == ()
    probe = "import novainfer.ab.trial.output_check as c, novainfer_adversarial; print(c.plugin_modules_loaded())"
    seen = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": str(site)}, check=True
    )
    assert "novainfer_adversarial" in seen.stdout  # the probe would see a loaded plugin


def test_the_core_reference_needs_no_plugin_and_no_plugin_may_take_its_name() -> None:
    import torch

    chosen = select_backend("reference", torch.device("cpu"), torch.float32, 16)
    assert chosen.plugin == "novainfer (core)"

    class Impostor:
        @hookimpl
        def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
            register(
                BackendSpec(
                    "reference",
                    object,
                    Capabilities(devices=("cpu",), dtypes=("float32",)),
                    contract_version=CONTRACT_VERSION,
                )
            )

    with pytest.raises(BackendError, match="registered twice"):
        discover_backends([Impostor()])


def test_the_floor_casts_the_reference_weights_to_those_the_arm_draws() -> None:
    """The floor shares the reference's weights cast to the arm's dtype instead of drawing them again: the same
    tensors, bit for bit, the tied embedding and head still one, the rotary tables (buffers) left in float32."""
    preset, cpu = "random:qwen2-tiny-wide", torch.device("cpu")
    fp32 = build_model(preset, 0, torch.float32, cpu, 64)
    cast, drawn = in_dtype(fp32, torch.bfloat16), build_model(preset, 0, torch.bfloat16, cpu, 64)
    assert in_dtype(fp32, torch.float32) is fp32 and next(fp32.parameters()).dtype == torch.float32
    for kind in ("named_parameters", "named_buffers"):
        ours, theirs = dict(getattr(cast, kind)()), dict(getattr(drawn, kind)())
        assert ours.keys() == theirs.keys() and theirs, kind
        for name, tensor in theirs.items():
            assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert cast.lm_head.weight is cast.embed_tokens.weight  # the preset ties them
