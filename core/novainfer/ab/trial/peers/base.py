"""What every peer engine starts from: the arm's settings, its model as a checkpoint directory, params and tags."""

from __future__ import annotations

import torch

from novainfer.ab.trial.checkpoints import materialize
from novainfer.ab.trial.engines import EngineUnavailable
from novainfer.ab.trial.environment import package_version
from novainfer.ab.trial.procedure import emit
from novainfer.ab.wire import TrialRequest
from novainfer.config import EngineConfig
from novainfer.engine import resolve_device, resolve_dtype


class PeerEngine:
    """A peer's trial engine, before its own parts (see novainfer.ab.trial.engines.TrialEngine).

    Opening checks what no peer here offers (a KV cache dtype other than the model's: skipped), and writes
    `random:<preset>` once as a checkpoint directory (novainfer.ab.trial.checkpoints), which peers load.
    params: the [engine] settings, the peer and its version; tags: peer_version.
    """

    name = ""  # the peer's name, as [[sweep.peers]] spells it; set by each subclass
    package = ""  # the distribution whose version is recorded

    def __init__(self, request: TrialRequest) -> None:
        self.config = EngineConfig(**request.config)
        self.options = {k: v for k, v in (request.peer or {}).items() if k != "peer"}
        self.workload = request.workload
        self.device = resolve_device(self.config.device)
        dtype = str(resolve_dtype(self.config.dtype, self.device)).removeprefix("torch.")
        if self.config.kv_cache_dtype not in ("auto", dtype):
            raise EngineUnavailable(
                f"{self.name} keeps its KV cache in the model's dtype ({dtype}), not {self.config.kv_cache_dtype}"
            )
        version = package_version(self.package)
        settings = {k: v for k, v in self.config.to_dict().items() if k not in ("backend", "backend_options")}
        self.params = {
            **{f"engine.{k}": str(v) for k, v in settings.items()},
            "peer": self.name,
            "peer_version": version,
            f"{self.name}_version": version,
            "novainfer_version": package_version("novainfer"),
            "torch_version": torch.__version__,
        }
        self.tags = {"peer_version": version}
        self.breakdown: dict[str, dict[str, float]] = {}
        emit("phase", name="checkpoint")
        self.model_dir = materialize(self.config.model, self.config.seed)

    def begin_timed(self) -> None:
        """Nothing to reset: a peer's metrics are read whole after the run."""
