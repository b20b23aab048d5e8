"""Random-weight models as real Hugging Face checkpoint directories, so other engines can load them.

`random:<preset>` exists only inside NovaInfer (init_random fills the weights at load); vLLM and transformers
load a directory. `materialize` writes the very weights our engine builds for a preset and seed, once, as
config.json plus model.safetensors under the standard Qwen2 names (q/k/v and gate/up stored separately, no
lm_head when tied), which transformers, vLLM and our own loader all read. No tokenizer is written: every
prompt is token ids.

The directory is content-addressed by its recipe: `<root>/<preset>-seed<seed>-<digest>/`, the digest over
the preset's shape, the seed, this writer's format and the source of the modules that build and fill the
model (models/qwen2.py, layers.py). A change to how random weights are made therefore lands in a new
directory instead of silently reusing stale weights; hashing the recipe rather than the 7 GB of weights keeps
a cache hit free.

Tensors are stored in float32, or in bfloat16 when every value is exactly a bfloat16 (init_random may round
them): either way each loader's cast to the run dtype gives bit for bit the weights of `random:<preset>`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from novainfer.layers import FusedLinear
from novainfer.models import qwen2
from novainfer.models.presets import RANDOM_PREFIX, preset_config

# Bump when the files written here change in a way a reader would notice.
FORMAT_VERSION = 1
# Where `materialize` caches directories by default, relative to the sweep's working directory.
CHECKPOINTS_DIR = Path(".nova-ab") / "checkpoints"
RECIPE_FILE = "novainfer-recipe.json"
# Checkpoint names of the parts we store fused, in shard order.
_UNFUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_dir(model: str, seed: int, root: Path = CHECKPOINTS_DIR) -> Path:
    """Where `materialize(model, seed, root)` puts the checkpoint of `random:<preset>`."""
    preset = model.removeprefix(RANDOM_PREFIX)
    return root / f"{preset}-seed{seed}-{_recipe_digest(model, seed)[:12]}"


def materialize(model: str, seed: int, root: Path = CHECKPOINTS_DIR) -> Path:
    """The checkpoint directory of `model`: itself for a directory, else the cached `random:<preset>` one.

    Written to a temporary directory and renamed into place, so a killed write never leaves a directory that
    looks complete, and two writers racing both end with the same files.
    """
    if not model.startswith(RANDOM_PREFIX):
        return Path(model)
    target = checkpoint_dir(model, seed, root)
    if (target / RECIPE_FILE).is_file():
        return target.resolve()
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        _write(model, seed, scratch)
        os.rename(scratch, target)
    except OSError:
        if not (target / RECIPE_FILE).is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target.resolve()


def _recipe(model: str, seed: int) -> dict:
    return {
        "format": FORMAT_VERSION,
        "model": model,
        "config": asdict(preset_config(model)),
        "seed": seed,
    }


def _recipe_digest(model: str, seed: int) -> str:
    digest = hashlib.sha256(json.dumps(_recipe(model, seed), sort_keys=True).encode())
    for module in (qwen2, inspect.getmodule(FusedLinear)):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def _write(model: str, seed: int, directory: Path) -> None:
    from safetensors.torch import save_file

    cfg = preset_config(model)
    # The weights exactly as our engine makes them (float32 on the CPU, before any cast to the run dtype).
    net = qwen2.build_model(model, seed, torch.float32, torch.device("cpu"), max_positions=1)
    tensors = hf_state_dict(net)
    del net
    dtype = torch.bfloat16 if all(_exact_in_bfloat16(t) for t in tensors.values()) else torch.float32
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    # transformers refuses a safetensors file without the "pt" format marker.
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_hf()
    config.update(hidden_act="silu", torch_dtype=str(dtype).removeprefix("torch."))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Last: its presence marks a complete directory.
    (directory / RECIPE_FILE).write_text(json.dumps(_recipe(model, seed), indent=2) + "\n")


def hf_state_dict(net: qwen2.Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """`net`'s weights under Hugging Face Qwen2 names, fused projections split, each tensor its own copy."""
    out: dict[str, torch.Tensor] = {}
    for name, param in net.named_parameters():  # a tied head is the embedding: named once, as HF saves it
        module_name, _, leaf = name.rpartition(".")
        module = net.get_submodule(module_name)
        parent, _, part = module_name.rpartition(".")
        if isinstance(module, FusedLinear):
            for shard, hf_part in enumerate(_UNFUSED[part]):
                out[f"model.{parent}.{hf_part}.{leaf}"] = param.data[module.shard_slice(shard)].clone()
        elif name == "lm_head.weight":
            out[name] = param.data.clone()
        else:
            out[f"model.{name}"] = param.data.clone()
    return out


def _exact_in_bfloat16(tensor: torch.Tensor) -> bool:
    return torch.equal(tensor.to(torch.bfloat16).to(tensor.dtype), tensor)
