"""NovaInfer: a fixed Qwen2 inference core whose attention backends are plugins, for A/B tests you can trust."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from novainfer.config import EngineConfig
    from novainfer.engine import LLM, RequestOutput
    from novainfer.sequence import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]

# Imported on first use, so `nova-ab` can validate an experiment file without loading torch.
_LAZY = {
    "LLM": "novainfer.engine",
    "RequestOutput": "novainfer.engine",
    "EngineConfig": "novainfer.config",
    "SamplingParams": "novainfer.sequence",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'novainfer' has no attribute {name!r}")
