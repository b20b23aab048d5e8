"""The GPU checks in bench/ where CI runs them: each builds and runs its attention cases on the CPU (`--cpu`, a dry
run with native's PyTorch path in place of the backend), and neither they nor the plugins' tests reach into the
engine: they drive it through novainfer.testing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
ATTENTION_ROWS = {
    "check_cudnn_gpu.py": [
        "decode, 32 (a bucket)", "decode, 13 (staged to 16)", "decode, 5 padded to 8", "prefill only",
        "prefill over cached prefix", "mixed", "mixed, decodes staged", "64 chunks over prefixes", "mixed, float16",
        "mixed, block size 64", "CUDA graph: capture, refill, replay", "padded entries write nothing",
    ],
    "check_flashinfer_gpu.py": [
        "decode-only", "prefill-only", "prefill over cached prefix", "mixed", "mixed, block size 1", "mixed, float16",
        "decode padded to bucket 8", "graph replay, bucket 8",
    ],
    "check_flashattn_gpu.py": [
        "decode-only", "prefill-only", "prefill over cached prefix", "mixed", "mixed, float16",
        "decode padded to bucket 8", "mixed, block size 1", "graph replay, bucket 8",
    ],
}


@pytest.mark.parametrize("script", sorted(ATTENTION_ROWS))
def test_a_gpu_check_builds_and_runs_its_attention_cases_on_the_cpu(script: str) -> None:
    args = ["--configs", "default"] if script == "check_flashinfer_gpu.py" else []
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "attention", "--cpu", *args], capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("\npart ")[-1].splitlines()[1:]
    names = ATTENTION_ROWS[script]
    assert [line[10:48].rstrip() for line in table[:-1]] == names
    assert all(line.startswith("attention ") and "  PASS  " in line for line in table[:-1]), table
    assert table[-1] == f"{len(names)} PASS, 0 FAIL"


def test_the_conformance_script_runs_the_kit_on_the_cpu() -> None:
    """bench/conformance_gpu.py --cpu: native through the kit over a bfloat16 and a float32 cache at both block
    sizes, each row held to the kit's floor-relative bar."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "conformance_gpu.py"), "--cpu"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| native |")]
    assert [(row[1], row[2], row[4], row[8]) for row in rows] == [
        (cache, block, "5/5", "PASS") for cache in ("bfloat16", "float32") for block in ("16", "1")
    ]
    assert done.stdout.splitlines()[-1] == "4 PASS, 0 FAIL, 0 refused"


def test_a_dry_run_is_of_the_attention_part_only() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "check_cudnn_gpu.py"), "logits", "--cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--cpu is a dry run of the attention part only" in done.stderr


# What a check may not touch: an engine's runner, scheduler, sequences, block manager, cache list and plugin
# manager (the block rounding rule, novainfer.block_manager.blocks_for, is no engine's), and a backend created or
# its hooks resolved by hand.
ENGINE_INSIDES = (
    r"\.runner\b|ScheduledSeq|SchedulerOutput|novainfer\.sequence|(?<!novainfer)\.block_manager\b|\.kv_caches\b|\.pm\b"
)
BY_HAND = r"engine_plugin_manager|resolve_hook|spec\.create"


def test_the_checks_drive_the_engine_through_the_kit_only() -> None:
    """bench's checks, and the plugins' tests (whose pip-installed option check creates a backend: the
    registry's own error is what it checks)."""
    checks = [*BENCH.glob("check_*_gpu.py"), BENCH / "gpu_check.py", BENCH / "conformance_gpu.py"]
    tests = [ROOT / "tests" / f"test_{name}_plugin.py" for name in ("cudnn", "flashinfer", "flashattn")]
    found = {
        str(path.relative_to(ROOT)): sorted(set(re.findall(pattern, path.read_text())))
        for paths, pattern in ((checks, f"{ENGINE_INSIDES}|{BY_HAND}"), (tests, ENGINE_INSIDES))
        for path in paths
    }
    assert len(found) == 9
    assert not {path: names for path, names in found.items() if names}
