"""The native backend: NovaInfer's own attention, the reference every other backend is checked against."""

from __future__ import annotations

from collections.abc import Callable

from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, hookimpl


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
            description="PyTorch reference (gather + SDPA) on any device",
        )
    )
