"""Whether a backend runs with given settings is decided once, from its declaration: option typos and settings a
backend does not take are the file's errors before any trial, an arm this machine cannot run is skipped with why,
a broken plugin is named and costs no other backend anything, and discovery runs once per process.

Plugins are real distributions installed with pip (tests/plugins/, and the flashattn plugin itself, whose
flash-attn 2 block-size rule the sweep must apply on a machine that has no FlashAttention and no GPU at all).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from test_sweep import nova_ab

from novainfer import LLM, SamplingParams
from novainfer.ab.wire import GateSettings, TrialRequest
from novainfer.ab.workload import Workload
from novainfer.backend_api import (
    CONTRACT_VERSION,
    AttentionContext,
    BackendError,
    BackendSpec,
    Capabilities,
    Settings,
    hookimpl,
)
from novainfer.backend_options import parse_options
from novainfer.config import EngineConfig
from novainfer.plugins import discover_backends

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(device="cpu", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_capacity=512)
EXPERIMENT = """
[workload]
num_seqs = 4
input_len = [8, 24]
output_len = [4, 12]

[engine]
model = "random:qwen2-tiny"
max_model_len = 64
kv_cache_capacity = 512
{engine}
[sweep]
repeats = 1
axes = {axes}
"""
BLOCK_16 = (
    "flash-attn 2 pages the KV cache only in blocks of a multiple of 256 tokens, not 16 (flash-attn-4 takes any "
    "block size)"
)


def experiment(tmp_path: Path, axes: str, engine: str = 'device = "cpu"', name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(EXPERIMENT.format(axes=axes, engine=engine))
    return path


def with_sites(*sites: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(map(str, sites))}


@pytest.fixture(scope="module")
def flashattn_site(pip_install: Callable[[Path], Path]) -> Path:
    return pip_install(ROOT / "plugins" / "flashattn")


@pytest.fixture(scope="module")
def broken_sites(pip_install: Callable[[Path], Path]) -> tuple[Path, Path]:
    """A plugin that raises on import and one whose hook is misspelled, each installed with pip."""
    return pip_install(ROOT / "tests" / "plugins" / "raising"), pip_install(ROOT / "tests" / "plugins" / "misspelled")


# ---------------------------------------------------------------------------------------------------------------
# nova-ab sweep --dry-run: every arm judged before any trial


@pytest.mark.parametrize(
    ("axes", "engine", "field", "problem"),
    [
        ('{ backend = ["native"] }', 'device = "cpu"\nbackend_options = { kernls = "torch" }', "engine.backend_options",
         "arm backend=native: native: unknown backend option(s) kernls; known: kernels"),
        ('{ backend = ["native"], backend_options = [{ kernels = "torch" }, { kernels = "cuda" }] }', 'device = "cpu"',
         "sweep.axes.backend_options",
         'arm backend=native,backend_options={"kernels":"cuda"}: native: kernels must be one of auto, triton, torch, '
         "got 'cuda'"),
        # A GPU arm, checked on a machine without GPU or FlashAttention: the rule is the backend's, not the machine's.
        ('{ backend = ["flashattn"], block_size = [256, 16] }',
         'device = "cuda"\nbackend_options = { generation = "2" }',
         "sweep.axes.backend", f"arm backend=flashattn,block_size=16: flashattn: {BLOCK_16}"),
        ('{ backend = ["flashattn"] }', 'device = "cuda"\nbackend_options = { generation = 3 }',
         "engine.backend_options", "arm backend=flashattn: flashattn: generation must be one of auto, 4, 2, got 3"),
        ('{ backend = ["flashattn"] }', 'device = "cpu"', "sweep.axes.backend",
         "arm backend=flashattn: flashattn: runs on cuda, not cpu"),
    ],
)
def test_settings_a_backend_does_not_take_are_file_errors_before_any_trial(
    tmp_path: Path, flashattn_site: Path, axes: str, engine: str, field: str, problem: str
) -> None:
    path = experiment(tmp_path, axes, engine)
    for args in (("--dry-run",), ()):  # the sweep itself refuses the file the same way, before any trial
        result = nova_ab(tmp_path, "sweep", str(path), *args, env=with_sites(flashattn_site))
        assert (result.returncode, result.stdout) == (2, ""), result
        assert result.stderr.splitlines() == [f"nova-ab: {path}: {field}: {problem}"], result.stderr
        assert not (tmp_path / ".nova-ab").exists()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="its hint shows without FlashAttention")
def test_backends_table_shows_an_install_hint_with_its_brackets(tmp_path: Path, flashattn_site: Path) -> None:
    table = nova_ab(tmp_path, "backends", env=with_sites(flashattn_site))
    assert table.returncode == 0, table.stderr
    # The "here" column is the table's last: its cells, joined across the lines a long one wraps onto.
    here = " ".join(line.split("│")[-2].strip() for line in table.stdout.splitlines() if line.count("│") > 2)
    assert "(pip install 'novainfer-plugin-flashattn[fa4]' for Hopper/Blackwell" in " ".join(here.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the verdicts below are a CPU machine's")
def test_dry_run_says_per_arm_whether_it_runs_here_in_seconds(tmp_path: Path, flashattn_site: Path) -> None:
    axes = '{ backend = ["native", "flashattn", "flashinfer"], block_size = [256] }'
    path = experiment(tmp_path, axes, 'device = "auto"')
    started = time.perf_counter()
    result = nova_ab(tmp_path, "sweep", str(path), "--dry-run", env=with_sites(flashattn_site))
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    arms = [line for line in result.stdout.splitlines() if line.startswith("  arm ")]
    try:  # whether flashinfer's plugin is installed here is the machine's business; either way it is skipped
        distribution("novainfer-plugin-flashinfer")
        flashinfer = "flashinfer: runs on cuda, not cpu (device auto is cpu here)"
    except PackageNotFoundError:
        flashinfer = "backend 'flashinfer' is not installed (pip install novainfer-plugin-flashinfer)"
    assert arms == [
        "  arm native: runs here",
        "  arm flashattn: skipped here: flashattn: runs on cuda, not cpu (device auto is cpu here)",
        f"  arm flashinfer: skipped here: {flashinfer}",
    ]
    # One process judges every arm: the dry run costs about a torch import, not one per arm.
    print(f"dry run of 3 arms: {seconds:.2f} s")
    assert seconds < 30


# ---------------------------------------------------------------------------------------------------------------
# Broken plugins


BROKEN_CHECK = """
import json
from novainfer import LLM, SamplingParams
from novainfer.backend_api import BackendError

llm = LLM("random:qwen2-tiny", device="cpu", max_model_len=64, kv_cache_capacity=256, backend="native")
(out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))
found = {"native_tokens": len(out.token_ids)}
for name in ("raising", "misspelled", "nope"):
    try:
        LLM("random:qwen2-tiny", device="cpu", backend=name)
    except BackendError as error:
        found[name] = str(error)
print(json.dumps(found))
"""
RAISING_WHY = "RuntimeError: novainfer_raising needs libwarp, which is not installed"
MISSPELLED_WHY = "register_backend is not a novainfer hook (did you mean register_backends?)"
RAISING = f"plugin novainfer-plugin-raising failed to load: {RAISING_WHY}"
MISSPELLED = f"plugin novainfer-plugin-misspelled failed to load: {MISSPELLED_WHY}"


def test_a_broken_plugin_is_named_and_every_other_backend_runs(tmp_path: Path, broken_sites: tuple[Path, Path]) -> None:
    env = with_sites(*broken_sites)
    result = subprocess.run(
        [sys.executable, "-c", BROKEN_CHECK], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["native_tokens"] == 4
    assert found["raising"].startswith(f"backend 'raising' is not available: {RAISING}; available backends: ")
    assert found["misspelled"].startswith(f"backend 'misspelled' is not available: {MISSPELLED}; available backends: ")
    assert found["nope"].startswith("unknown backend 'nope'; available backends: ")
    assert RAISING in found["nope"] and MISSPELLED in found["nope"]

    rows = {r["backend"]: r for r in json.loads(nova_ab(tmp_path, "backends", "--format", "json", env=env).stdout)}
    assert rows["native"]["here"] == "available"
    assert rows["raising"]["plugin"] == "novainfer-plugin-raising"
    assert rows["raising"]["here"] == f"plugin failed to load: {RAISING_WHY}"
    assert rows["misspelled"]["here"] == f"plugin failed to load: {MISSPELLED_WHY}"
    table = nova_ab(tmp_path, "backends", env={**env, "COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    assert "novainfer-plugin-raising" in table.stdout and "novainfer-plugin-misspelled" in table.stdout

    path = experiment(tmp_path, '{ backend = ["native", "raising"] }')
    dry = nova_ab(tmp_path, "sweep", str(path), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "  arm native: runs here" in dry.stdout.splitlines()
    assert f"  arm raising: skipped here: backend 'raising' is not available: {RAISING}" in dry.stdout.splitlines()


# ---------------------------------------------------------------------------------------------------------------
# Discovery once per process


def test_a_gated_trial_discovers_the_plugins_once(tmp_path: Path, pip_install: Callable[[Path], Path]) -> None:
    """A whole trial in its own process, as the executor runs it: the timed engine, its correctness gate's three
    engines and the recorded versions all share one discovery."""
    counts = tmp_path / "discoveries.txt"
    config = EngineConfig(
        model="random:qwen2-tiny-wide", device="cpu", dtype="float32", max_model_len=96, max_num_seqs=4,
        max_num_batched_tokens=48, kv_cache_capacity=512,
    )
    request = TrialRequest(
        sweep_id="s", trial_id="t#0", arm="t", arm_params={}, repeat=0, order=0, config=config.to_dict(),
        workload=Workload(num_seqs=4, input_len=(16, 32), output_len=(4, 8), seed=1), warmup_seqs=1,
        gate=GateSettings(), result_path=str(tmp_path / "result.json"), source_dir=str(ROOT),
    )
    env = {**os.environ, **with_sites(pip_install(ROOT / "tests" / "plugins" / "counting")),
           "NOVAINFER_COUNT_FILE": str(counts)}
    done = subprocess.run(
        [sys.executable, "-m", "novainfer.ab.trial"], input=request.to_json(), capture_output=True, text=True,
        timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["status"] == "ok", record["reason"]
    assert record["metrics"]["gate_steps"] >= 1
    assert len(counts.read_text().splitlines()) == 1
    # The versions recorded are the selected backend's own (native: triton), not a list the core keeps.
    assert record["params"]["triton_version"] == version("triton")
    assert not {key for key in record["params"] if key.startswith(("flashinfer", "cudnn", "flash_attn"))}


# ---------------------------------------------------------------------------------------------------------------
# The contract, in-process: options typed by the plugin, parsed by the core, judged by its check


@dataclass(frozen=True)
class EchoOptions:
    scale: float = 1.0
    mode: Literal["plain", "wide"] = "plain"
    fused: bool | Literal["auto"] = "auto"


class EchoPlugin:
    """Native's hooks under a name of their own, with options and a settings rule of their own."""

    def __init__(self) -> None:
        self.created_with: list[Any] = []

    def create(self, context: AttentionContext) -> object:
        from novainfer_native.backend import NativeBackend

        self.created_with.append(context.options)
        return NativeBackend(context)

    @staticmethod
    def check(settings: Settings) -> str | None:
        if settings.options.mode == "wide" and settings.block_size < 32:
            return f"mode wide needs blocks of at least 32 tokens, not {settings.block_size}"
        return None

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        caps = Capabilities(devices=("cpu",), dtypes=("float32",))
        register(
            BackendSpec(
                "echo", self.create, caps, options=EchoOptions, check=self.check, contract_version=CONTRACT_VERSION
            )
        )


def test_the_backend_is_created_with_its_parsed_options_or_not_at_all() -> None:
    plugin = EchoPlugin()
    llm = LLM("random:qwen2-tiny", backend="echo", plugins=[plugin], backend_options={"scale": 2, "fused": True},
              block_size=32, **TINY)
    assert plugin.created_with == [EchoOptions(scale=2, fused=True)]
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))
    for options, block_size, problem in [
        ({"mode": "tall"}, 32, "echo: mode must be one of plain, wide, got 'tall'"),
        ({"scale": True}, 32, "echo: scale must be a number, got True"),
        ({"scale": "2"}, 32, "echo: scale must be a number, got '2'"),
        ({"fused": 1}, 32, 'echo: fused must be true, false or "auto", got 1'),
        ({"sclae": 2.0}, 32, "echo: unknown backend option(s) sclae; known: scale, mode, fused"),
        ({"mode": "wide"}, 16, "echo: mode wide needs blocks of at least 32 tokens, not 16"),
    ]:
        with pytest.raises(BackendError) as error:
            LLM("random:qwen2-tiny", backend="echo", plugins=[plugin], backend_options=options,
                block_size=block_size, **TINY)
        assert str(error.value) == problem
    assert len(plugin.created_with) == 1
    assert parse_options("echo", EchoOptions, EchoOptions(mode="wide")) == EchoOptions(mode="wide")


class Misspelled:
    @hookimpl
    def register_backend(self, register: Callable[[BackendSpec], None]) -> None:
        raise AssertionError("never called")


@dataclass(frozen=True)
class NoDefault:
    scale: float


@dataclass(frozen=True)
class ListOption:
    sizes: list[int] = ()  # type: ignore[assignment]


class DeclaresOptions:
    def __init__(self, options: type) -> None:
        self.options = options

    @hookimpl
    def register_backends(self, register: Callable[[BackendSpec], None]) -> None:
        register(
            BackendSpec(
                "declares",
                object,
                Capabilities(("cpu",), ("float32",)),
                options=self.options,
                contract_version=CONTRACT_VERSION,
            )
        )


@pytest.mark.parametrize(
    ("plugin", "problem"),
    [
        (Misspelled(), "register_backend is not a novainfer hook (did you mean register_backends?)"),
        (DeclaresOptions(NoDefault), "backend 'declares': option scale has no default"),
        (DeclaresOptions(ListOption), "backend 'declares': option sizes: list[int] is not bool, int, float, str, a "
                                      "Literal or a union of them"),
        (DeclaresOptions(dict), "backend 'declares': options must be a dataclass type, got <class 'dict'>"),
    ],
)
def test_a_plugin_the_core_cannot_read_is_refused_with_why(plugin: object, problem: str) -> None:
    with pytest.raises(BackendError) as error:
        discover_backends([plugin])
    assert str(error.value) == problem
