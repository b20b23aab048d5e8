"""Model shapes: the Qwen2 config we read from checkpoints, and named presets of real shapes.

`random:<preset>` builds random weights with a preset's exact shapes, so performance work can
use real sizes on machines that cannot download weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Qwen2Config:
    """The subset of a Hugging Face Qwen2 config.json the model needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    eos_token_id: int | None = None
    initializer_range: float = 0.02  # the standard deviation of random weights (init_random)

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> Qwen2Config:
        heads = data["num_attention_heads"]
        eos = data.get("eos_token_id")
        rope = data.get("rope_parameters") or {}
        return cls(
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=data.get("num_key_value_heads", heads),
            head_dim=data.get("head_dim") or data["hidden_size"] // heads,
            rope_theta=float(data.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            max_position_embeddings=int(data.get("max_position_embeddings", 32768)),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            initializer_range=float(data.get("initializer_range", 0.02)),
        )

    @classmethod
    def from_dir(cls, path: Path) -> Qwen2Config:
        return cls.from_hf(json.loads((path / "config.json").read_text()))

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers' Qwen2ForCausalLM loads."""
        data = asdict(self)
        data.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", torch_dtype="bfloat16")
        return data


PRESETS: dict[str, Qwen2Config] = {
    # Vocabulary 10240: nano-vllm-style random prompts draw ids up to 10000.
    "qwen2-tiny": Qwen2Config(
        vocab_size=10240, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    # qwen2-tiny's random weights are so small that attention barely moves the residual stream: its greedy
    # output repeats the prompt's last token whatever attention returns. Weights ten times wider make the
    # tokens depend on attention (zeroing it, or scaling it by 2%, changes most of them), so token-level
    # checks on this preset mean something.
    "qwen2-tiny-wide": Qwen2Config(
        vocab_size=10240, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        max_position_embeddings=4096, initializer_range=0.2,
    ),
    "qwen2-0.5b": Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "deepseek-r1-distill-qwen-1.5b": Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, head_dim=128, rope_theta=10000.0,
        tie_word_embeddings=False, max_position_embeddings=131072,
    ),
    "qwen2-7b": Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
}

RANDOM_PREFIX = "random:"


def preset_config(model: str) -> Qwen2Config:
    """The config for `random:<preset>`; raises KeyError naming the known presets."""
    name = model.removeprefix(RANDOM_PREFIX)
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name])
