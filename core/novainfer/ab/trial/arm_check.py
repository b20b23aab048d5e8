"""`python -m novainfer.ab.trial.arm_check`: whether each arm of a sweep runs here, judged before any trial, all
arms in this one process (the sweep process imports no torch; this one does, once, and discovers the backends
once).

stdin:  {"arms": [{"label": str, "config": an EngineConfig as a dict, "peer": a peer's name or null}, ...]}
stdout: {"cuda": whether torch sees a CUDA device here,
         "arms": {label: {"runs": true} | {"skip": why} | {"error": [setting, problem]}}}
An error is the file's fault, on any machine (`setting` is the EngineConfig field it is about); a skip is this
machine's (the arm's trials are recorded as skipped, with why).

Our engine's arms are judged in this order (novainfer.backend_check says why the two questions are apart):
1. the backend's name: one no plugin has is an error; one whose plugin is not installed here, or failed to
   load, is a skip (its options cannot be judged);
2. its options, then whether it takes the settings (capabilities, its own check): errors, except a device it
   does not run on when the arm says device = "auto", which is this machine's doing;
3. this machine: a CUDA arm where there is no CUDA, then the backend's own `unavailable`: skips.
A peer arm is skipped when it needs CUDA that is not here, or its package is not installed.
"""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from typing import Any

import torch

from novainfer.backend_api import BackendError, Settings
from novainfer.backend_check import dtype_name, unsupported_reason
from novainfer.backend_options import parse_options
from novainfer.config import EngineConfig
from novainfer.cuda_graphs import capture_refusal
from novainfer.engine import resolve_dtype
from novainfer.plugins import FIRST_PARTY_PLUGINS, SettingsError, find_backend, one_line, registry

NO_CUDA = "needs a CUDA GPU and this machine has none (nova-ab sweep refuses the file here)"
RUNS: dict[str, Any] = {"runs": True}


def skip(reason: str) -> dict[str, Any]:
    return {"skip": reason}


def error(setting: str, problem: str) -> dict[str, Any]:
    return {"error": [setting, problem]}


def judge_arm(config: EngineConfig, peer: str | None, cuda: bool) -> dict[str, Any]:
    """The verdict on one arm (see the module's docstring)."""
    if peer is not None:
        from novainfer.ab.trial.peers import PEERS  # only for a peer arm: its schemas cost a quarter second

        if config.device == "cuda" and not cuda:
            return skip(NO_CUDA)
        return RUNS if find_spec(PEERS[peer].package) is not None else skip(f"{peer} is not installed")
    try:
        return _judge_backend(config, cuda)
    except Exception as failure:  # a plugin's check or unavailable raised: its bug, shown before any trial
        return error("backend", f"{config.backend}: judging these settings raised {one_line(failure)}")


def _judge_backend(config: EngineConfig, cuda: bool) -> dict[str, Any]:
    found = registry()
    known = ", ".join(sorted({*found.backends, *FIRST_PARTY_PLUGINS}))
    listing = f"available backends: {known} (installed: {', '.join(sorted(found.backends))})"
    try:
        backend = find_backend(config.backend, found, listing)
    except SettingsError as problem:
        return error(problem.setting, str(problem))
    except BackendError as missing:
        return skip(str(missing))
    spec = backend.spec
    try:
        options = parse_options(spec.name, spec.options, config.backend_options)
    except BackendError as problem:
        return error("backend_options", str(problem))
    # "auto" is what this machine makes of it, as the engine would; "cuda" stays the arm's, CUDA or not.
    device = torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and cuda) else "cpu")
    attention_dtype = config.kv_cache_dtype if config.kv_cache_dtype != "auto" else config.dtype
    graphs = config.cuda_graphs and capture_refusal(device, spec) is None
    settings = Settings(device.type, dtype_name(resolve_dtype(attention_dtype, device)), config.block_size, graphs,
                        options)
    reason = unsupported_reason(spec, settings)
    if reason and config.device == "auto" and device.type not in spec.capabilities.devices:
        return skip(f"{spec.name}: {reason} (device auto is {device.type} here)")
    if reason:
        return error("backend", f"{spec.name}: {reason}")
    if device.type == "cuda" and not cuda:
        return skip(NO_CUDA)
    reason = spec.unavailable(settings)
    return skip(f"{spec.name}: {reason}") if reason else RUNS


def main() -> int:
    request = json.loads(sys.stdin.read())
    cuda = torch.cuda.is_available()
    verdicts = {arm["label"]: judge_arm(EngineConfig(**arm["config"]), arm["peer"], cuda) for arm in request["arms"]}
    print(json.dumps({"cuda": cuda, "arms": verdicts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
