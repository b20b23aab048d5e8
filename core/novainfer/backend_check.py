"""Whether a backend can run with given settings, judged from its declaration (backend_api.BackendSpec) alone.

Two questions, kept apart because they end differently: are these settings wrong for the backend on any
machine (`unsupported_reason`: its capabilities, then its own check; a sweep refuses the file), or can this
machine not run them (`BackendSpec.unavailable`: a library missing, no GPU; a sweep skips the arm, saying why).
The sweep asks them of every arm before any trial (novainfer.ab.trial.arm_check); the registry asks them again
of the settings a backend is created with (`create_checked`), so an engine never builds a backend they refuse.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from novainfer.backend_api import AttentionContext, BackendError, BackendSpec, Settings
from novainfer.backend_options import parse_options


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the names capabilities and Settings use."""
    return str(dtype).removeprefix("torch.")


def unsupported_reason(spec: BackendSpec, settings: Settings) -> str | None:
    """Why `spec` cannot take these settings on any machine (one line), or None."""
    caps = spec.capabilities
    if settings.device not in caps.devices:
        return f"runs on {', '.join(caps.devices)}, not {settings.device}"
    if settings.dtype not in caps.dtypes:
        return f"supports dtypes {', '.join(caps.dtypes)}, not {settings.dtype}"
    if caps.block_sizes is not None and settings.block_size not in caps.block_sizes:
        return f"supports block sizes {', '.join(map(str, caps.block_sizes))}, not {settings.block_size}"
    return spec.check(settings)


def default_reason(spec: BackendSpec, device: torch.device, dtype: torch.dtype, block_size: int) -> str | None:
    """Why nothing of `spec` runs here at these settings with its default options (one line), or None: what
    `nova-ab backends` and the engine's list of available backends say. The machine is asked first."""
    settings = Settings(device.type, dtype_name(dtype), block_size, cuda_graphs=False, options=spec.options())
    return spec.unavailable(None) or unsupported_reason(spec, settings)


def create_checked(spec: BackendSpec, context: AttentionContext) -> object:
    """`spec.create`, once the settings it is created with pass: its options parsed (the instance replaces the
    table in the context), then capabilities and check, then this machine. Raises BackendError, one line that
    starts with the backend's name."""
    options = parse_options(spec.name, spec.options, context.options)
    settings = Settings(
        context.device.type, dtype_name(context.dtype), context.block_size, context.cuda_graphs, options
    )
    reason = unsupported_reason(spec, settings) or spec.unavailable(settings)
    if reason:
        raise BackendError(f"{spec.name}: {reason}")
    return spec.create(replace(context, options=options))
