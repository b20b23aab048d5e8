"""Engine settings: one frozen dataclass, validated on construction.

Every field is a setting a sweep may vary (nova-ab's `[engine]` table and `[sweep]` axes use
these names), so each carries its valid values in the error it raises.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A setting with an invalid value; `field` names it so callers can report `file: field: problem`."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class EngineConfig:
    """What the engine runs and how.

    model: a Hugging Face checkpoint directory, or `random:<preset>` for random weights of a real shape.
    backend: the attention backend's name, as a plugin registers it (`nova-ab backends` lists them).
    backend_options: backend-specific settings, passed through to the backend unchanged.
    dtype: weight and activation dtype; "auto" is bfloat16 on CUDA and float32 on CPU.
    kv_cache_dtype: the KV cache's dtype, which is also the dtype attention runs in (the backend
        gets queries, keys and values cast to it); "auto" follows `dtype`. A float32 model over a
        bfloat16 cache checks a bfloat16 backend with no other rounding in the way.
    device: "auto" picks CUDA when present.
    seed: the random-weight seed (ignored for checkpoints).
    block_size: tokens per KV-cache block.
    max_model_len: the longest prompt plus output a request may have.
    max_num_seqs: the most sequences in one step.
    max_num_batched_tokens: the token budget of one step (prefill chunks and decodes together).
    kv_cache_capacity: KV-cache size in tokens, or "auto" to size it from free memory.
    gpu_memory_utilization: with "auto", the fraction of device memory the engine may hold in all.
    cuda_graphs: capture the decode forward in CUDA graphs (backends that cannot be captured run eagerly).
    async_scheduling: schedule and prepare the next step while this one runs on the device (its sampled tokens
        stay on the device as the next step's inputs; the host learns them a step later, and an EOS stop a step
        late, its extra token dropped). On the CPU a worker thread stands in for the device's stream.
    enable_prefix_caching: keep the KV blocks of prompt prefixes after their requests finish, and start a
        request that shares a cached prefix of full blocks after it (novainfer.prefix_cache).
    """

    model: str = "random:qwen2-tiny"
    backend: str = "native"
    backend_options: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    block_size: int = 16
    max_model_len: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384
    kv_cache_capacity: int | Literal["auto"] = "auto"
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = False
    async_scheduling: bool = True
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        for name in ("dtype", "kv_cache_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(name, f"must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}")
        if self.device not in DEVICES:
            raise ConfigError("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.kv_cache_capacity != "auto" and (
            isinstance(self.kv_cache_capacity, bool)
            or not isinstance(self.kv_cache_capacity, int)
            or self.kv_cache_capacity < self.block_size
        ):
            raise ConfigError(
                "kv_cache_capacity",
                f'must be "auto" or a number of tokens of at least block_size ({self.block_size}), '
                f"got {self.kv_cache_capacity!r}",
            )
        for name in ("cuda_graphs", "async_scheduling", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
