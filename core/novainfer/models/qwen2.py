"""Qwen2 causal LM over the paged KV cache, with attention delegated to the backend hooks."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from novainfer.backend_api import BackendError
from novainfer.layers import FusedLinear, RMSNorm, RotaryEmbedding, silu_and_mul
from novainfer.models.presets import RANDOM_PREFIX, Qwen2Config, preset_config


@dataclass(frozen=True)
class StepContext:
    """What every layer of one step needs for attention: the backend's metadata, the cache, the hooks, and
    attention_output [num_tokens, num_q_heads, head_dim], the model runner's buffer the attention hook writes
    each layer's result into (the layer reads it back before the next layer's call overwrites it)."""

    metadata: Any
    slot_mapping: torch.Tensor
    kv_caches: list[torch.Tensor]
    write_kv: Callable[..., Any]
    attention: Callable[..., Any]
    attention_output: torch.Tensor


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = FusedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=True)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        kv_cache = step.kv_caches[self.layer_idx]
        # Attention runs in the cache's dtype (a no-op when it is the model's).
        q, k, v = q.to(kv_cache.dtype), k.to(kv_cache.dtype), v.to(kv_cache.dtype)
        step.write_kv(
            layer_idx=self.layer_idx, key=k, value=v, kv_cache=kv_cache,
            slot_mapping=step.slot_mapping, metadata=step.metadata,
        )
        out = step.attention_output
        written = step.attention(
            layer_idx=self.layer_idx, query=q, kv_cache=kv_cache, metadata=step.metadata, scale=self.scale,
            output=out,
        )
        if written is not True:
            # A result returned instead of written (the contract before `output`) would be dropped unseen.
            raise BackendError(f"attention answered {type(written).__name__}, not True: it writes into `output`")
        return self.o_proj(out.reshape(-1, self.q_size).to(x.dtype))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_idx, rotary)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, step: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (hidden, residual), the residual stream passed along as in vLLM.

        Each sublayer's output leaves the residual add to the norm that follows it, which fuses the
        two (the first layer's input, with residual None, is the stream itself); the stream after
        this layer is hidden + residual.
        """
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, step)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: Qwen2Config, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta)  # one table, shared by all layers
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i, rotary) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make the embedding the head where the config ties them (again after moving off the meta device,
        which gives each module its own parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step: StepContext) -> torch.Tensor:
        """Final hidden states [T, hidden] of a step's tokens."""
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, step)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


# Checkpoint names of parts we store fused: (fused module attribute, shard index).
_FUSED_PARTS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    return files


def load_checkpoint(model: Qwen2ForCausalLM, path: Path) -> None:
    """Copy a Hugging Face Qwen2 checkpoint's tensors into `model`; every parameter must be found."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[str] = set()
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name = hf_name.removeprefix("model.")
                if name == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                tensor = f.get_tensor(hf_name)
                module, _, leaf = name.rpartition(".")
                parent, _, part = module.rpartition(".")
                if part in _FUSED_PARTS:
                    fused, shard = _FUSED_PARTS[part]
                    target = f"{parent}.{fused}.{leaf}"
                    linear = model.get_submodule(f"{parent}.{fused}")
                    params[target].data[linear.shard_slice(shard)].copy_(tensor)
                    filled.add(f"{target}#{shard}")
                    continue
                if name not in params:
                    raise KeyError(f"{file.name}: unexpected tensor {hf_name}")
                params[name].data.copy_(tensor)
                filled.add(name)
    expected = _expected_entries(model)
    missing = sorted(expected - filled)
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _expected_entries(model: Qwen2ForCausalLM) -> set[str]:
    entries = set()
    for name, _ in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, FusedLinear):
            entries.update(f"{name}#{i}" for i in range(len(module.shard_sizes)))
        else:
            entries.add(name)
    return entries


def init_random(model: Qwen2ForCausalLM, seed: int) -> None:
    """Deterministic random weights: each tensor from its own CPU generator seeded by (seed, name).

    CPU generation is bitwise the same on every machine, and seeding per name makes a tensor's
    values independent of the order parameters are created in. Values are rounded to bfloat16, as
    in the bfloat16 checkpoints real models ship: a float32 engine and a bfloat16 one then hold the
    same weights, and comparing them measures compute, not weight rounding.
    """
    def fill(name: str, param: torch.Tensor) -> None:
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.data.fill_(1.0)
            return
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * model.config.initializer_range
        param.data.copy_(values.to(torch.bfloat16))

    # One generator per tensor draws serially, so tensors are drawn in parallel threads (torch releases the GIL):
    # the same values, in about the largest tensor's time on a many-core host. With the meta-device build below, a
    # conformance run that builds the 1.5B model fell from ~30 s to ~5 s on the H200's host (bench/RESULTS.md).
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        for done in [pool.submit(fill, name, param) for name, param in model.named_parameters()]:
            done.result()


def build_model(
    model: str, seed: int, dtype: torch.dtype, device: torch.device, max_positions: int
) -> Qwen2ForCausalLM:
    """The model for `random:<preset>` or a checkpoint directory, in `dtype` on `device`, in eval mode."""
    if model.startswith(RANDOM_PREFIX):
        cfg = preset_config(model)
    else:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
        cfg = Qwen2Config.from_dir(path)
    # Build and fill on the CPU in float32, then move: random values stay machine-independent and
    # checkpoint tensors are copied once. Parameters are made on the meta device and left uninitialized:
    # every one is filled below, and default initialization would cost a 1.5B model ~25 s of CPU for nothing.
    with torch.device("meta"):
        net = Qwen2ForCausalLM(cfg, max_positions)
    net.to_empty(device="cpu")
    net.tie_weights()
    for module in net.modules():
        if isinstance(module, RotaryEmbedding):
            module.fill()
    if model.startswith(RANDOM_PREFIX):
        init_random(net, seed)
    else:
        load_checkpoint(net, Path(model))
    return _cast_parameters(net, dtype).to(device).eval().requires_grad_(False)


def in_dtype(model: Qwen2ForCausalLM, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """`model` with its parameters in `dtype` (a copy, unless they are in it already): the very model build_model
    gives in `dtype`, since it builds every model in float32 and casts, in seconds less (a 1.5B model's random
    weights take ~5 s of host time to draw)."""
    if next(model.parameters()).dtype == dtype:
        return model
    return _cast_parameters(copy.deepcopy(model), dtype)  # tied parameters stay one parameter


def _cast_parameters(net: Qwen2ForCausalLM, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """`net` with its parameters in `dtype`: only parameters take the model dtype, the rotary tables (buffers)
    stay float32."""
    for param in net.parameters():
        param.data = param.data.to(dtype)
    return net
