"""Which arms of an experiment run here: every arm judged once per sweep (or dry run), before any trial.

The judgement needs the backends' plugins and torch, which the sweep process never imports, so it runs in one
child process for all arms (novainfer.ab.trial.arm_check, JSON in and out). Most of its time is importing
torch, so the CLI starts it first (`start_arm_check`) and loads the experiment meanwhile. Settings that are
wrong for an arm's backend on any machine (an option typo, a block size it does not take) come back as the
file's error, `file: field: problem` naming the arm; an arm this machine cannot run (a library missing, no
GPU) comes back with the reason its trials are skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from novainfer.ab.sweep.experiment import Experiment, ExperimentError, source_field

ARM_CHECK = "novainfer.ab.trial.arm_check"
ARM_CHECK_TIMEOUT_S = 300
# Where a CPU-only machine should go instead of a CUDA experiment.
CPU_EXPERIMENT = "experiments/smoke.toml"


@dataclass(frozen=True)
class ArmsHere:
    """cuda: whether this machine has a CUDA device; skipped: arm label -> why its trials are skipped here
    (an arm not in it runs here)."""

    cuda: bool
    skipped: dict[str, str]


def start_arm_check() -> subprocess.Popen[str]:
    """The judging process, started now: it imports what it needs, then waits for the arms on stdin."""
    return subprocess.Popen(
        [sys.executable, "-m", ARM_CHECK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def check_arms(experiment: Experiment, process: subprocess.Popen[str] | None = None) -> ArmsHere:
    """Judge every arm here, in `process` (from start_arm_check) or a new one; the first arm whose settings are
    wrong raises ExperimentError (one line)."""
    process = process or start_arm_check()
    arms = [
        {"label": arm.label, "config": arm.config.to_dict(), "peer": arm.peer["peer"] if arm.peer else None}
        for arm in experiment.arms
    ]
    try:
        stdout, stderr = process.communicate(json.dumps({"arms": arms}), timeout=ARM_CHECK_TIMEOUT_S)
    finally:
        if process.poll() is None:  # timed out, or interrupted: it must not outlive the sweep
            process.kill()
            process.wait()
    if process.returncode != 0:  # a bug of ours, not the file's: say where, with the child's own traceback
        raise RuntimeError(f"{ARM_CHECK} exited with {process.returncode}:\n{stderr}")
    answer = json.loads(stdout)
    skipped: dict[str, str] = {}
    for arm in experiment.arms:
        verdict = answer["arms"][arm.label]
        if "error" in verdict:
            setting, problem = verdict["error"]
            raise ExperimentError(
                experiment.path, source_field(setting, arm.params, arm.source), f"arm {arm.label}: {problem}"
            )
        if "skip" in verdict:
            skipped[arm.label] = verdict["skip"]
    return ArmsHere(answer["cuda"], skipped)


def check_runnable(experiment: Experiment, cuda: bool) -> None:
    """Raise ExperimentError when an arm needs CUDA (device = "cuda") and this machine has none: the sweep
    refuses the file rather than record every such arm as skipped."""
    cuda_arms = [arm for arm in experiment.arms if arm.config.device == "cuda"]
    if not cuda_arms or cuda:
        return
    field = "sweep.axes.device" if "device" in experiment.sweep.axes else "engine.device"
    raise ExperimentError(
        experiment.path,
        field,
        f'{len(cuda_arms)} of {len(experiment.arms)} arms need a CUDA GPU (device = "cuda") and '
        f"torch.cuda.is_available() is False; on a CPU machine run {CPU_EXPERIMENT}",
    )
