"""The flashattn backend: FlashAttention's paged forward (flash-attn-4, or flash-attn 2) over the core's BLOCK cache.

Registering is cheap: FlashAttention is imported only when the backend is created (backend.load_kernels),
and availability is judged from installed-package metadata and torch's view of the GPU. Both packages
install the module `flash_attn`; importing it (flash-attn 2's loads its CUDA extension) is what this
avoids, so the versions are read from the distributions' metadata.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import torch

from novainfer.backend_api import AttentionContext, BackendError, BackendSpec, Capabilities, Settings, hookimpl
from novainfer_flashattn.checks import Options, check, choose_generation


def installed_versions() -> tuple[str | None, str | None]:
    """The installed versions of flash-attn-4 and flash-attn (2.x); None for one not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None, None
    found = []
    for dist in ("flash-attn-4", "flash-attn"):
        try:
            found.append(version(dist))
        except PackageNotFoundError:
            found.append(None)
    return found[0], found[1]


def _capability(device: torch.device | None = None) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None


def _unavailable(settings: Settings | None = None) -> str | None:
    # Without settings, whether any generation runs here at some block size (flash-attn 2's rule left out).
    if settings is None:
        return choose_generation("auto", *installed_versions(), _capability(), None)[1]
    capability = _capability() if settings.device == "cuda" else None
    return choose_generation(settings.options.generation, *installed_versions(), capability, settings.block_size)[1]


def _versions() -> dict[str, str]:
    fa4, fa2 = installed_versions()
    return {name: v for name, v in (("flash-attn-4", fa4), ("flash-attn", fa2)) if v is not None}


def _create(context: AttentionContext) -> object:
    # The generation is chosen before FlashAttention is imported: only the chosen one is loaded.
    options = context.options
    capability = _capability(context.device) if context.device.type == "cuda" else None
    generation, reason = choose_generation(
        options.generation, *installed_versions(), capability, context.block_size
    )
    if generation is None:
        raise BackendError(f"flashattn: {reason}")
    from novainfer_flashattn.backend import FlashAttnBackend, load_kernels

    return FlashAttnBackend(context, options, load_kernels(generation))


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    register(
        BackendSpec(
            name="flashattn",
            create=_create,
            capabilities=Capabilities(devices=("cuda",), dtypes=("bfloat16", "float16"), cuda_graphs=True),
            options=Options,
            check=check,
            unavailable=_unavailable,
            versions=_versions,
            description=(
                "FlashAttention paged varlen: flash-attn-4 (sm90/sm100, any block size) or flash-attn 2 "
                "(sm80+, blocks of a multiple of 256)"
            ),
            contract_version=2,
        )
    )
