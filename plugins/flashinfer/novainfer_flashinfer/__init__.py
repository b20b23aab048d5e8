"""The flashinfer backend: FlashInfer's paged decode and prefill kernels over the core's BLOCK cache.

Registering is cheap: flashinfer is imported only when the backend is created, and availability is
judged from installed-package metadata and torch's view of the GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch

from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, Settings, hookimpl
from novainfer_flashinfer.checks import Options, unavailable_reason


def _installed_version() -> str | None:
    if importlib.util.find_spec("flashinfer") is None:
        return None
    try:
        return version("flashinfer-python")
    except PackageNotFoundError:
        return None


def _unavailable(settings: Settings | None = None) -> str | None:
    # No option needs anything the others do not.
    cuda = torch.cuda.is_available()
    return unavailable_reason(_installed_version(), cuda, torch.cuda.get_device_capability() if cuda else None)


def _versions() -> dict[str, str]:
    installed = _installed_version()
    return {"flashinfer-python": installed} if installed else {}


def _create(context: AttentionContext) -> object:
    from novainfer_flashinfer.backend import FlashInferBackend

    return FlashInferBackend(context, context.options)


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    register(
        BackendSpec(
            name="flashinfer",
            create=_create,
            capabilities=Capabilities(devices=("cuda",), dtypes=("bfloat16", "float16"), cuda_graphs=True),
            options=Options,
            unavailable=_unavailable,
            versions=_versions,
            description="FlashInfer paged decode and prefill wrappers",
            contract_version=2,
        )
    )
