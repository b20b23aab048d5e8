"""The names a person reads in MLflow's runs table: each arm by what sets it apart, each sweep with its counter first.

MLflow's runs table shows about 24 characters of a run's name. An arm's label spells every axis in file
order ("backend=native,max_num_batched_tokens=64"), so the part that differs is cut off; its short name
leads with what differs ("native · bt=64") and a trial's child run adds the repeat ("native · bt=64 · #1").
A sweep's parent run leads with the experiment's name and counter ("smoke #3 · 53613337f43f"), so seven
sweeps of one file do not all read "smoke-53613337f43f-...".
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SEPARATOR = " · "
# Engine settings as they are abbreviated in short names.
ABBREVIATIONS = {
    "max_num_batched_tokens": "bt",
    "max_num_seqs": "seqs",
    "block_size": "bs",
    "kv_cache_dtype": "kv",
    "kv_cache_capacity": "kv_cap",
    "cuda_graphs": "graphs",
    "max_model_len": "len",
    "gpu_memory_utilization": "mem",
}
# Axes whose value alone names the arm.
BARE = ("backend", "peer")


class HasParams(Protocol):
    label: str
    params: dict[str, Any]


def arm_names(arms: Sequence[HasParams]) -> dict[str, str]:
    """Arm label -> short name: the values that differ between the arms, in the arm's own order; the
    backend's and a peer's name bare, backend options as key=value, other settings abbreviated. An arm
    whose short name would not be unique keeps its label."""
    keys = dict.fromkeys(key for arm in arms for key in arm.params)
    varying = {
        key for key in keys
        if len({_show(arm.params[key]) if key in arm.params else None for arm in arms}) > 1
    }
    names = {arm.label: SEPARATOR.join(_parts(arm.params, varying)) or arm.label for arm in arms}
    taken = Counter(names.values())
    return {label: name if taken[name] == 1 else label for label, name in names.items()}


def _parts(params: dict[str, Any], varying: set[str]) -> list[str]:
    parts: list[str] = []
    for key, value in params.items():
        if key not in varying:
            continue
        if key in BARE:
            parts.append(str(value))
        elif key == "backend_options" and isinstance(value, dict):
            parts.extend(f"{k}={_show(v)}" for k, v in value.items())
        else:
            parts.append(f"{ABBREVIATIONS.get(key, key)}={_show(value)}")
    return parts


def record_names(records: Iterable[HasArm]) -> dict[str, str]:
    """Arm label -> short name from a sweep's records (what `nova-ab compare` reads back from MLflow): the names
    arm_names gave the sweep's arms, each record carrying its arm's label and params. The params come back with
    their keys sorted (the ledger and MLflow store them so), so each is put back in its label's order, the file's
    axis order, which the names follow: "native · async_scheduling=true" as the sweep and MLflow's runs table
    show it, not "async_scheduling=true · native"."""
    arms = {r.arm: _ArmOfRecord(r.arm, _in_label_order(r.arm, r.arm_params)) for r in records}
    return arm_names(list(arms.values()))


def _in_label_order(label: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` ordered as their keys appear in `label` ("axis=value,..."); a key the label lacks goes last."""

    def position(key: str) -> int:
        if label.startswith(f"{key}="):
            return 0
        found = label.find(f",{key}=")
        return len(label) if found < 0 else found

    return {key: params[key] for key in sorted(params, key=position)}


class HasArm(Protocol):
    arm: str
    arm_params: dict[str, Any]


@dataclass(frozen=True)
class _ArmOfRecord:
    label: str
    params: dict[str, Any]


def trial_name(arm_name: str, repeat: int) -> str:
    return f"{arm_name}{SEPARATOR}#{repeat}"


def sweep_name(experiment_name: str, counter: int, sweep_id: str) -> str:
    return f"{experiment_name} #{counter}{SEPARATOR}{sweep_id}"


def metric_prefix(arm_name: str) -> str:
    """An arm's short name as an MLflow metric-key prefix (keys allow letters, digits, `_-. :/` and spaces)."""
    return arm_name.replace(SEPARATOR, " ").replace("=", ":")


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
