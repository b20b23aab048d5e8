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

from novainfer.backend_api import AttentionContext, BackendError, BackendSpec, Capabilities, hookimpl
from novainfer_flashattn.checks import choose_generation, parse_options


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


def _unavailable() -> str | None:
    # The registry asks before a block size is known: flash-attn 2's block-size rule is checked at creation.
    return choose_generation("auto", *installed_versions(), _capability(), None)[1]


def _create(context: AttentionContext) -> object:
    # Options and the generation are checked before FlashAttention is imported, so a typo fails fast.
    options = parse_options(context.options)
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
            capabilities=Capabilities(
                devices=("cuda",), dtypes=("bfloat16", "float16"), cuda_graphs=True, kv_layout="NHD"
            ),
            unavailable=_unavailable,
            description=(
                "FlashAttention paged varlen: flash-attn-4 (sm90/sm100, any block size) or flash-attn 2 "
                "(sm80+, blocks of a multiple of 256); option generation"
            ),
        )
    )
