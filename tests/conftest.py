"""Shared fixtures: real checkpoints written by transformers into temp dirs, and plugins installed by pip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU under Triton's interpreter, which is chosen when kernels are
# decorated: it must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    _patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor_index(tensor: type, scope: interpreter._LangPatchScope) -> None:
        # triton 3.6's interpreter turns a scalar into an int with int(array) on the 1-element array
        # it holds, which numpy >= 2.4 refuses, so loops bounded by a loaded value fail
        # (triton-lang/triton#9171, fixed upstream after 3.6). Squeezing to 0-d first works on any numpy.
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor_index


def write_qwen2_checkpoint(
    path: Path, *, tied: bool, heads: int, kv_heads: int, seed: int = 0, shard: bool = False
) -> Path:
    """Save a random Qwen2ForCausalLM with transformers' own save_pretrained (safetensors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=512, hidden_size=heads * 16, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        # A wide init spreads the logits, so greedy choices are not decided by rounding.
        initializer_range=0.2, eos_token_id=None, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    # transformers zero-inits the q/k/v biases; make them matter.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100KB" if shard else "10GB")
    return path


@pytest.fixture(scope="session")
def tied_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen2_checkpoint(tmp_path_factory.mktemp("tied"), tied=True, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def untied_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen2_checkpoint(tmp_path_factory.mktemp("untied"), tied=False, heads=6, kv_heads=1, shard=True)


@pytest.fixture(scope="session")
def pip_install(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """Installs a distribution's source directory with pip into a directory of its own, returned for
    PYTHONPATH: the plugin is then found through its entry point, as a user's install would be.

    pip builds from a copy, since a build leaves build/ and *.egg-info behind in the source tree.
    """

    def install(source: Path) -> Path:
        ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
        copy = shutil.copytree(source, tmp_path_factory.mktemp(f"{source.name}-src") / source.name, ignore=ignore)
        target = tmp_path_factory.mktemp(f"{source.name}-site")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
             str(target), str(copy)],
            check=True, capture_output=True,
        )
        return target

    return install
