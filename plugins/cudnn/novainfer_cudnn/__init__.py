"""The cudnn backend: attention on cuDNN's paged SDPA graphs (nvidia-cudnn-frontend).

Registering is cheap: nothing here imports cuDNN; `novainfer_cudnn.backend` does, when the backend is
created.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch

from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, Settings, hookimpl
from novainfer_cudnn.buckets import Options

# Paged K/V caches need cuDNN 9.5 and ragged queries with grouped KV heads 9.6, but packed (ragged)
# queries over a paged cache only work from 9.10 (cudnn-frontend's paged-prefill sample gates them on
# it); the prefill graphs need all three.
MIN_BACKEND_VERSION = 91000


def version_string(version: int) -> str:
    """cuDNN 9's integer version (major * 10000 + minor * 100 + patch) as text."""
    return f"{version // 10000}.{version // 100 % 100}.{version % 100}"


def too_old_reason(version: int) -> str:
    return (
        f"cuDNN {version_string(version)} is too old: packed queries over a paged KV cache need "
        f"cuDNN >= {version_string(MIN_BACKEND_VERSION)}"
    )


def unavailable_reason(frontend_installed: bool, cuda_available: bool, backend_version: int | None) -> str | None:
    """Why the backend cannot run, from what was found on this machine; None when it can."""
    if not frontend_installed:
        return "nvidia-cudnn-frontend is not installed (pip install nvidia-cudnn-frontend)"
    if not cuda_available:
        return "needs CUDA, and no CUDA device is available here"
    if backend_version is None:
        return "no cuDNN library is loaded by torch"
    if backend_version < MIN_BACKEND_VERSION:
        return too_old_reason(backend_version)
    return None


def unavailable(settings: Settings | None = None) -> str | None:
    """The reason for this machine, without importing cuDNN: `BackendSpec.unavailable`. No setting changes
    what cuDNN needs."""
    frontend = importlib.util.find_spec("cudnn") is not None
    cuda = torch.cuda.is_available()
    # The library torch loaded. The frontend loads the same wheel's (nvidia-cudnn-cu*) unless
    # LD_LIBRARY_PATH names another; creating the backend checks the frontend's own answer.
    version = torch.backends.cudnn.version() if frontend and cuda else None
    return unavailable_reason(frontend, cuda, version)


def _versions() -> dict[str, str]:
    """The frontend's version, and the cuDNN library torch loaded (what the frontend runs on, see unavailable)."""
    found = {}
    with contextlib.suppress(PackageNotFoundError):
        found["nvidia-cudnn-frontend"] = version("nvidia-cudnn-frontend")
    if torch.backends.cudnn.is_available() and torch.backends.cudnn.version() is not None:
        found["cudnn"] = version_string(torch.backends.cudnn.version())
    return found


def _create(context: AttentionContext) -> object:
    from novainfer_cudnn.backend import CudnnBackend

    return CudnnBackend(context)


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    register(
        BackendSpec(
            name="cudnn",
            create=_create,
            capabilities=Capabilities(
                devices=("cuda",),
                dtypes=("bfloat16", "float16"),
                cuda_graphs=True,
            ),
            options=Options,
            unavailable=unavailable,
            versions=_versions,
            description="cuDNN paged SDPA graphs, every shape bucket built at start",
            contract_version=2,
        )
    )
