"""Peers: other inference engines run as arms of a sweep, on the same workload and caliber as ours.

An experiment file adds one arm per `[[sweep.peers]]` entry (see novainfer.ab.sweep.experiment). This module is what
the file's validation needs to know about each peer: its name, the package it needs, the module that runs it and
the schema of its own settings. It imports neither torch nor any peer's package, so validating a file stays cheap
and works where no peer is installed; a peer's package is imported only inside its trial.

Each peer module (vllm_peer, transformers_peer) has `open_engine(request)`, which returns an engine of
the shape novainfer.ab.trial.engines.TrialEngine describes, so a peer arm goes through the very trial procedure
our engine's arms do (one gate verdict, one timed run, one per-request caliber rule). `open` and the engine's
steps raise novainfer.ab.trial.engines.EngineUnavailable where the peer cannot run here (too old, no usable
device, a KV cache dtype it lacks): the trial is then "skipped" with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class PeerOptions(BaseModel):
    """Settings a peer has beyond the [engine] ones; strict and closed, like every table of the file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class VllmOptions(PeerOptions):
    """vLLM takes only [engine] settings: see vllm_peer for how each one maps."""


class TransformersOptions(PeerOptions):
    """attn_implementation: the attention transformers' continuous batching runs, as transformers names it
    ("sdpa", "paged|eager", "flash_attention_2", ...). It is used as written: the automatic switch to flash
    attention is off, so the arm measures the implementation it names."""

    attn_implementation: str = "sdpa"


@dataclass(frozen=True)
class Peer:
    """package: the import name whose absence skips the peer; module: the module that runs its trials;
    online: whether its engine can run an online caliber (requests arriving over time: its engine has `serve`)."""

    package: str
    module: str
    options: type[PeerOptions]
    online: bool = False


PEERS: dict[str, Peer] = {
    "vllm": Peer("vllm", "novainfer.ab.trial.peers.vllm_peer", VllmOptions, online=True),
    "transformers": Peer("transformers", "novainfer.ab.trial.peers.transformers_peer", TransformersOptions),
}
