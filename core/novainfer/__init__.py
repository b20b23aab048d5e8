"""NovaInfer: a fixed Qwen2 inference core whose attention backends are plugins, for A/B tests you can trust."""

from novainfer.config import EngineConfig
from novainfer.engine import LLM, RequestOutput
from novainfer.sequence import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]
