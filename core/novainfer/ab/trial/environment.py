"""What a number was measured on: versions, device and host, for params and tags of every trial."""

from __future__ import annotations

import platform
import resource
import socket
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit(start: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(start), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip()
    if not commit:
        return "unknown"
    dirty = subprocess.run(
        ["git", "-C", str(start), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, timeout=5, check=False,
    ).stdout.strip()
    return f"{commit}-dirty" if dirty else commit


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: the allocator's on CUDA (since its last reset), the resident set's on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_tags(device: torch.device) -> dict[str, str]:
    tags = {
        "host": socket.gethostname(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cuda_version": str(torch.version.cuda),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        uuid = str(props.uuid)
        tags.update(
            device_name=props.name, driver=_driver_version(), gpu_memory_gib=f"{props.total_memory / 2**30:.1f}",
            # Which GPU, of several alike: a sweep spread over GPUs compares arms within one (nova-ab compare).
            gpu_uuid=uuid if uuid.startswith("GPU-") else f"GPU-{uuid}",
        )
    else:
        tags.update(device_name=platform.processor() or platform.machine(), driver="none", gpu_uuid="none")
    return tags


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
