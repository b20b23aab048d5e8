"""Backends are found through entry points or registered in-process; exactly one answers the hooks."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable, Generator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
import torch

from novainfer import LLM, SamplingParams, backend_api
from novainfer.backend_api import (
    CONTRACT_VERSION,
    AttentionContext,
    BackendError,
    BackendSpec,
    Capabilities,
    NoOptions,
    Settings,
    StepBatch,
    hookimpl,
)
from novainfer.backend_check import unsupported_reason
from novainfer.plugins import Registry, discover_backends, find_backend

TINY = dict(device="cpu", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_capacity=512)


class CountingBackend:
    """Delegates to native and counts hook calls, to check when the core calls each hook."""

    def __init__(self, context: AttentionContext) -> None:
        from novainfer_native.backend import NativeBackend

        self.native = NativeBackend(context)
        self.calls = {"metadata": 0, "attention": 0}

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> object:
        self.calls["metadata"] += 1
        return self.native.prepare_attention_metadata(batch=batch)

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
    ) -> bool:
        self.calls["attention"] += 1
        return self.native.attention(query=query, kv_cache=kv_cache, metadata=metadata, scale=scale, output=output)


class InProcessPlugin:
    def __init__(self) -> None:
        self.instances: list[CountingBackend] = []

    def create(self, context: AttentionContext) -> CountingBackend:
        self.instances.append(CountingBackend(context))
        return self.instances[-1]

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(
            BackendSpec(
                "counting",
                self.create,
                Capabilities(devices=("cpu",), dtypes=("float32",)),
                contract_version=CONTRACT_VERSION,
            )
        )
        register(
            BackendSpec(
                "needs-gpu-lib",
                self.create,
                Capabilities(devices=("cpu",), dtypes=("float32",)),
                unavailable=lambda settings: "gpulib is not installed",
                contract_version=CONTRACT_VERSION,
            )
        )


def test_native_is_found_through_its_pip_installed_entry_point() -> None:
    dist = distribution("novainfer-plugin-native")
    assert any(ep.group == "novainfer" and ep.name == "native" for ep in dist.entry_points)
    native = discover_backends()["native"]
    assert native.plugin == "novainfer-plugin-native" and native.version == dist.version
    assert native.spec.capabilities.devices == ("cpu", "cuda")


def test_in_process_plugin_is_found_and_hooks_run_once_per_step_and_per_layer() -> None:
    plugin = InProcessPlugin()
    assert {"native", "counting"} <= set(discover_backends([plugin]))
    llm = LLM("random:qwen2-tiny", backend="counting", plugins=[plugin], **TINY)
    backend = plugin.instances[-1]
    layers = llm.model_config.num_hidden_layers
    assert backend.calls == {"metadata": 1, "attention": layers}  # the engine's warm-up step
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, ignore_eos=True))
    steps = len(llm.step_stats)
    assert backend.calls["metadata"] == steps + 1
    assert backend.calls["attention"] == (steps + 1) * layers


def test_unknown_and_unavailable_backends_fail_with_the_available_list() -> None:
    # The core's reference is always there; which plugins are installed beside native is the machine's business.
    listing = r"^unknown backend 'nope'; available backends: (\w+, )*native, (\w+, )*reference"
    with pytest.raises(BackendError, match=listing):
        LLM("random:qwen2-tiny", backend="nope", **TINY)
    with pytest.raises(BackendError, match="gpulib is not installed; available backends: counting, native"):
        LLM("random:qwen2-tiny", backend="needs-gpu-lib", plugins=[InProcessPlugin()], **TINY)
    # flashinfer never runs on a CPU: with its plugin installed it says why not (its library is missing, or the
    # GPU), else what to install.
    try:
        distribution("novainfer-plugin-flashinfer")
        why = r"^backend 'flashinfer' is not available: (?!.*novainfer-plugin-flashinfer).*; available backends: "
    except PackageNotFoundError:
        why = r"^backend 'flashinfer' is not installed \(pip install novainfer-plugin-flashinfer\)"
    with pytest.raises(BackendError, match=why):
        LLM("random:qwen2-tiny", backend="flashinfer", **TINY)  # TINY's device is the CPU
    # And what to install, whatever this machine has (the registry of a machine with no plugin installed).
    missing = r"^backend 'cudnn' is not installed \(pip install novainfer-plugin-cudnn\)$"
    with pytest.raises(BackendError, match=missing):
        find_backend("cudnn", Registry({}), "available backends: none")
    counting = discover_backends([InProcessPlugin()])["counting"].spec
    assert unsupported_reason(counting, Settings("cuda", "float32", 16, False, NoOptions())) == "runs on cpu, not cuda"
    assert unsupported_reason(counting, Settings("cpu", "bfloat16", 16, False, NoOptions())) == (
        "supports dtypes float32, not bfloat16"
    )


class OtherContractPlugin:
    """A backend registering for contract `version` (None: saying for none)."""

    def __init__(self, version: int | None) -> None:
        self.version = version

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        caps = Capabilities(devices=("cpu",), dtypes=("float32",))
        register(BackendSpec("elsewhere", object, caps, contract_version=self.version))


@pytest.mark.parametrize("version", [CONTRACT_VERSION - 1, CONTRACT_VERSION + 1])
def test_a_backend_of_another_contract_is_refused_naming_both_versions(version: int) -> None:
    core = distribution("novainfer").version
    with pytest.raises(BackendError) as refused:
        LLM("random:qwen2-tiny", backend="elsewhere", plugins=[OtherContractPlugin(version)], **TINY)
    assert str(refused.value) == (
        f"backend 'elsewhere' of in-process was written for backend contract {version}; "
        f"this core (novainfer {core}) implements backend contract {CONTRACT_VERSION}"
    )
    with pytest.raises(BackendError, match=rf"^backend 'elsewhere' of in-process declares no contract_version; "
                       rf"this core \(novainfer {core}\) implements backend contract {CONTRACT_VERSION} "):
        discover_backends([OtherContractPlugin(None)])
    assert "elsewhere" in discover_backends([OtherContractPlugin(CONTRACT_VERSION)])


OLD_PLUGIN = {
    "pyproject.toml": """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "novainfer-plugin-oldcontract"
version = "0.0.1"
dependencies = ["novainfer"]

[project.entry-points.novainfer]
oldcontract = "novainfer_oldcontract"

[tool.setuptools]
py-modules = ["novainfer_oldcontract"]
""",
    "novainfer_oldcontract.py": """from novainfer.backend_api import BackendSpec, Capabilities, hookimpl


@hookimpl
def register_backends(register):
    register(BackendSpec("oldcontract", object, Capabilities(("cpu",), ("float32",)), contract_version=1))
""",
}


def test_an_installed_plugin_of_another_contract_is_listed_as_refused_and_the_rest_load(
    tmp_path: Path, pip_install: Callable[[Path], Path]
) -> None:
    source = tmp_path / "oldcontract"
    source.mkdir()
    for name, text in OLD_PLUGIN.items():
        (source / name).write_text(text)
    site = pip_install(source)
    listing = subprocess.run(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", "backends", "--format", "json"], cwd=tmp_path,
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert listing.returncode == 0, listing.stderr
    rows = {row["backend"]: row for row in json.loads(listing.stdout)}
    assert rows["native"]["here"] == "available"
    assert rows["oldcontract"]["plugin"] == "novainfer-plugin-oldcontract"
    assert rows["oldcontract"]["here"] == (
        "plugin failed to load: backend 'oldcontract' of novainfer-plugin-oldcontract was written for backend "
        f"contract 1; this core (novainfer {distribution('novainfer').version}) implements backend contract "
        f"{CONTRACT_VERSION}"
    )


def test_every_hook_is_documented() -> None:
    hooks = [f for name, f in inspect.getmembers(backend_api, inspect.isfunction) if hasattr(f, "novainfer_spec")]
    assert {f.__name__ for f in hooks} >= {"register_backends", "prepare_attention_metadata", "write_kv", "attention"}
    for hook in hooks:
        doc = inspect.getdoc(hook) or ""
        assert "Called" in doc, f"{hook.__name__} does not say when it is called"
        assert ":returns:" in doc or "register" in hook.__name__, f"{hook.__name__} does not say what it returns"
        for param in inspect.signature(hook).parameters:
            assert f":param {param}:" in doc, f"{hook.__name__} does not document {param}"


class ReturnsItsOutput:
    """An attention that returns its result instead of writing it into `output`: the contract before `output`."""

    @hookimpl
    def attention(self, query: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(query)


class OldContractPlugin:
    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        caps = Capabilities(devices=("cpu",), dtypes=("float32",))
        register(
            BackendSpec("returns-output", lambda context: ReturnsItsOutput(), caps, contract_version=CONTRACT_VERSION)
        )


def test_an_attention_that_returns_its_result_is_refused_not_dropped() -> None:
    with pytest.raises(BackendError, match=r"^attention answered Tensor, not True: it writes into `output`$"):
        LLM("random:qwen2-tiny", backend="returns-output", plugins=[OldContractPlugin()], **TINY)


class CountingObserver:
    """A hook wrapper that counts the calls it sees, as any observer may."""

    def __init__(self) -> None:
        self.calls = {"prepare_attention_metadata": 0, "write_kv": 0, "attention": 0}

    def _count(self, hook: str) -> Generator[None, Any, Any]:
        self.calls[hook] += 1
        return (yield)

    @hookimpl(wrapper=True)
    def prepare_attention_metadata(self) -> Generator[None, Any, Any]:
        return (yield from self._count("prepare_attention_metadata"))

    @hookimpl(wrapper=True)
    def write_kv(self) -> Generator[None, Any, Any]:
        return (yield from self._count("write_kv"))

    @hookimpl(wrapper=True)
    def attention(self) -> Generator[None, Any, Any]:
        return (yield from self._count("attention"))


def test_observers_see_every_hook_call() -> None:
    observer = CountingObserver()
    llm = LLM("random:qwen2-tiny", backend="native", observers=[observer], warm_up=False, **TINY)
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))
    layers = llm.model_config.num_hidden_layers
    assert observer.calls == {"prepare_attention_metadata": 4, "write_kv": 4 * layers, "attention": 4 * layers}
