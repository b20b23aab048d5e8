"""Peers: other inference engines run as arms of a sweep, on the same workload and caliber as ours.

An experiment file adds one arm per `[[sweep.peers]]` entry (see novainfer.ab.experiment). This module is what
the file's validation needs to know about each peer: its name, the package it needs, the module that runs it and
the schema of its own settings. It imports neither torch nor any peer's package, so validating a file stays cheap
and works where no peer is installed; a peer's package is imported only inside its trial.

Each peer module (vllm_peer, transformers_peer) provides:

    start(config, options, model_dir) -> a started engine with
        generate(prompts, output_lens, on_tokens) -> output tokens per request (EOS ignored, greedy),
        params (the arguments passed to the peer, as "<peer>.<argument>"), tags (attention_backend,
        cuda_graphs_mode), metrics() (memory, KV cache size), close();
    correctness(config, model_dir, gate) -> the largest relative logits error against our native reference,
        where the peer can compute teacher-forced logits; a peer without it records the gate as not applicable.

and may raise PeerUnavailable from either, which the trial records as "skipped" with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, too old): its trials are skipped with this message."""


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
    """package: the import name whose absence skips the peer; module: the module that runs its trials."""

    package: str
    module: str
    options: type[PeerOptions]


PEERS: dict[str, Peer] = {
    "vllm": Peer("vllm", "novainfer.ab.peers.vllm_peer", VllmOptions),
    "transformers": Peer("transformers", "novainfer.ab.peers.transformers_peer", TransformersOptions),
}
