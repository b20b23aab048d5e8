"""The native backend: NovaInfer's own attention, the reference every other backend is checked against."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, Settings, hookimpl


@dataclass(frozen=True)
class Options:
    """kernels: "auto" (Triton on CUDA when triton is installed, else PyTorch), "triton" or "torch"."""

    kernels: Literal["auto", "triton", "torch"] = "auto"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable(settings: Settings | None = None) -> str | None:
    """Only kernels="triton" can lack what it needs: the rest runs on plain PyTorch anywhere."""
    if settings is not None and settings.options.kernels == "triton" and not _has_triton():
        return "kernels='triton' but triton is not installed"
    return None


def _versions() -> dict[str, str]:
    try:
        return {"triton": version("triton")}
    except PackageNotFoundError:
        return {}


def _create(context: AttentionContext) -> object:
    from novainfer_native.backend import NativeBackend

    return NativeBackend(context)


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    register(
        BackendSpec(
            name="native",
            create=_create,
            capabilities=Capabilities(
                devices=("cpu", "cuda"), dtypes=("float32", "bfloat16", "float16"), cuda_graphs=True
            ),
            options=Options,
            unavailable=unavailable,
            versions=_versions,
            description="PyTorch reference (gather + SDPA) on any device, Triton kernels on CUDA",
            contract_version=2,
        )
    )
