"""Files the JIT compilers on this machine wrote: listed before and after a timed window, for every arm alike.

Our backends count their own compiles in-process (Triton's kernel cache, cuDNN graph builds, flashinfer's
modules), but a peer's engine compiles in processes the trial does not reach (vLLM's engine core), and its own JIT
monitor watches Triton and CuTeDSL, not flashinfer. Every compiler leaves its result on disk, in its cache: a file
that appears there inside the timed window is a compile (or a cache entry) the run paid for, whichever engine or
process wrote it. The caches are found as each compiler finds them: Triton's (TRITON_CACHE_DIR), flashinfer's
(FLASHINFER_WORKSPACE_BASE/.cache/flashinfer), torch inductor's (TORCHINDUCTOR_CACHE_DIR) and vLLM's
torch.compile cache (VLLM_CACHE_ROOT), each at its compiler's default where its variable is unset.
"""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path


def cache_dirs() -> list[Path]:
    """The JIT caches of this process's environment (some may not exist yet)."""
    home = Path.home()
    flashinfer_base = Path(os.environ.get("FLASHINFER_WORKSPACE_BASE") or home)
    inductor = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
    return [
        Path(os.environ.get("TRITON_CACHE_DIR") or home / ".triton" / "cache"),
        flashinfer_base / ".cache" / "flashinfer",
        Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor),
        Path(os.environ.get("VLLM_CACHE_ROOT") or home / ".cache" / "vllm"),
    ]


def cached_files() -> set[str]:
    """Every file under the JIT caches now (paths; a cache that is not there has none)."""
    found: set[str] = set()
    for root in cache_dirs():
        for folder, _, files in os.walk(root):
            found.update(os.path.join(folder, name) for name in files)
    return found
