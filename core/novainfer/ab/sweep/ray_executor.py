"""Trials on a Ray cluster: `nova-ab sweep FILE --executor ray` spreads one sweep over every GPU Ray can see.

Ray places the work: the sweep asks for as many workers as the cluster has room for (a worker holds
`gpus_per_trial` GPUs, or `cpus_per_trial` CPUs for a CPU caliber), Ray puts each on a node and a device,
and each worker runs whole repeat blocks, trial after trial, in fresh processes exactly as the local
executor does (timeout, crash and hang isolation, the same record). So every arm of a repeat runs on the
same GPU, and `nova-ab compare` can pair them by GPU. The driver hands a free worker the next block; it
alone writes the ledger and MLflow, from the records (and each trial's log) the workers return.

Without RAY_ADDRESS a local Ray instance is started (and stopped with the sweep); with it, the sweep joins
that cluster, whose workers must have this package installed at the same path (Ray's runtime_env is the
place for that). Ctrl-C kills the workers, and with them the running trials.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from novainfer.ab.sweep.executor import LocalSubprocessExecutor, ProgressCallback, RecordCallback, log_name
from novainfer.ab.wire import TrialRecord, TrialRequest

INSTALL = "pip install 'novainfer[ray]'"
# The driver's environment variables a trial must see on a worker (a plugin found through PYTHONPATH).
INHERITED_ENV = ("PYTHONPATH",)


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached (one line)."""


@dataclass(frozen=True)
class TrialResources:
    """What one worker (one trial at a time) holds: GPUs, and CPUs (a CPU caliber's share)."""

    gpus: float
    cpus: float


class TrialWorker:
    """One trial at a time on the device Ray gave this worker, in a fresh process as LocalSubprocessExecutor
    runs it; returns the record, the trial's log and where it ran."""

    def run(self, request_json: str, timeout_s: float) -> tuple[dict[str, Any], str, dict[str, str]]:
        import ray

        request = TrialRequest.from_json(request_json)
        with tempfile.TemporaryDirectory(prefix="nova-ab-ray-") as logs:
            record = LocalSubprocessExecutor(Path(logs)).run_trial(request, timeout_s, lambda event: None)
            log = "".join(path.read_text(errors="replace") for path in Path(logs).glob("*.log"))
        context = ray.get_runtime_context()
        placement = {
            "executor": "ray",
            "ray_node": context.get_node_id(),
            "ray_gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()) or "none",
        }
        return record.to_dict(), log, placement


class RayExecutor:
    """Runs repeat blocks on Ray workers, one block per worker at a time (see the module docstring)."""

    def __init__(self, log_dir: Path, resources: TrialResources) -> None:
        try:
            import ray
        except ImportError:
            raise RayUnavailable(f"Ray is not installed ({INSTALL})") from None
        self.ray = ray
        self.log_dir = log_dir
        self.resources = resources
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                ray.init(
                    address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                    configure_logging=False, runtime_env={"env_vars": _inherited_env()},
                )
            except Exception as error:  # a wrong address, an unreachable head: one line, not Ray's traceback
                raise RayUnavailable(f"Ray: cannot start or join a cluster: {error}".splitlines()[0]) from error

    def slots(self) -> int:
        """How many workers the cluster holds at once."""
        available = self.ray.cluster_resources()
        if self.resources.gpus > 0:
            return int(available.get("GPU", 0) // self.resources.gpus)
        return int(available.get("CPU", 0) // max(self.resources.cpus, 1e-9))

    def run(
        self, blocks: Sequence[Sequence[TrialRequest]], timeout_s: float, on_record: RecordCallback,
        on_progress: ProgressCallback,
    ) -> None:
        ray = self.ray
        slots = min(self.slots(), len(blocks))
        if not blocks:
            self._close([])
            return
        if slots < 1:
            kind = "GPU" if self.resources.gpus > 0 else "CPU"
            raise RayUnavailable(f"the Ray cluster has no {kind} for a trial ({self.resources})")
        worker_class = ray.remote(num_gpus=self.resources.gpus, num_cpus=self.resources.cpus)(TrialWorker)
        workers = [worker_class.remote() for _ in range(slots)]
        pending = deque(iter(block) for block in blocks)
        running: dict[Any, tuple[Any, Iterator[TrialRequest]]] = {}

        def submit(worker: Any, block: Iterator[TrialRequest]) -> None:
            """The block's next trial on `worker`, or the next block's first once this one is done."""
            request = next(block, None)
            while request is None and pending:
                block = pending.popleft()
                request = next(block, None)
            if request is not None:
                running[worker.run.remote(request.to_json(), timeout_s)] = (worker, block)

        try:
            for worker in workers:
                submit(worker, iter(()))
            while running:
                (done,), _ = ray.wait(list(running), num_returns=1)
                worker, block = running.pop(done)
                record = self._received(*ray.get(done))
                submit(worker, block)
                on_record(record)
        finally:
            self._close(workers)

    def _close(self, workers: list[Any]) -> None:
        """Kill the workers (a running trial dies with its worker) and stop a Ray this sweep started."""
        for worker in workers:
            self.ray.kill(worker)
        if self.started_here:
            self.ray.shutdown()

    def _received(self, data: dict[str, Any], log: str, placement: dict[str, str]) -> TrialRecord:
        """The record as the runner keeps it: where it ran among its tags, its log in the sweep's logs/."""
        record = TrialRecord.from_dict(data)
        record.tags.update(placement)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"{log_name(record.trial_id)}.log").write_text(log)
        return record


def _inherited_env() -> dict[str, str]:
    """What a worker's trials must see as the driver's would: where plugins are installed (PYTHONPATH)."""
    return {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}


def resources_for(gpus_per_trial: float | None, cpus_per_trial: float, any_cuda_arm: bool) -> TrialResources:
    """A trial's resources: the file's [sweep.ray] values, GPUs defaulting to 1 for a sweep with CUDA arms."""
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if any_cuda_arm else 0.0)
    return TrialResources(gpus=gpus, cpus=cpus_per_trial)

