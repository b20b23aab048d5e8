"""Backends that misbehave on purpose, so the sweep's fault handling is tested through real plugins.

raises: attention raises.  hangs: attention never returns.  wrong: attention is off by 5%.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, hookimpl
from novainfer_native.backend import NativeBackend


class Raises(NativeBackend):
    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        raise RuntimeError("injected attention failure")


class Hangs(NativeBackend):
    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        while True:
            time.sleep(1)


class Wrong(NativeBackend):
    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        super().attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale, output=output)
        output.mul_(1.05)
        return True


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    caps = Capabilities(devices=("cpu",), dtypes=("float32",))
    backends: dict[str, Callable[[AttentionContext], object]] = {"raises": Raises, "hangs": Hangs, "wrong": Wrong}
    for name, create in backends.items():
        register(BackendSpec(name, create, caps, description=f"test backend that {name}", contract_version=2))
