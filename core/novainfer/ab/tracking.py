"""MLflow logging of sweeps: one parent run per sweep, one child run per trial.

Layout in the experiment:
- parent run (tags nova.kind=sweep, nova.sweep_id, nova.baseline_arm): params = the experiment's
  settings, artifacts = the experiment file and the comparison plot.
- child run per trial (tags mlflow.parentRunId, nova.kind=trial, nova.trial_id, nova.arm, ...): params,
  metrics and tags of the TrialRecord, artifact config.json = the resolved engine config and, for our
  engine's trials, breakdown.json = the timed run by step class (tag nova.breakdown names it). Its MLflow
  status is FAILED when the trial did not run to completion (nova.status "failed" or "timeout") and
  FINISHED otherwise; the verdict itself ("ok", "incorrect", ...) is always the nova.status tag.

Logging is idempotent: a trial whose child already exists is not logged again, so the runner may log
live and `import_ledger` may replay the whole ledger afterwards. MLflow is imported lazily, inside
`Tracker`, so trial subprocesses (and a runner whose store is down) never need it; every store failure
surfaces as one `TrackingError` with a one-line message.

The ledger is the source of truth: records reach MLflow only after they are in the ledger.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.request import pathname2url

from novainfer.ab.ledger import Ledger, LedgerError
from novainfer.ab.record import TrialRecord

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run

TAG_KIND = "nova.kind"
TAG_SWEEP_ID = "nova.sweep_id"
TAG_BASELINE = "nova.baseline_arm"
TAG_TRIAL_ID = "nova.trial_id"
TAG_ARM = "nova.arm"
TAG_ARM_PARAMS = "nova.arm_params"
TAG_REPEAT = "nova.repeat"
TAG_ORDER = "nova.order"
TAG_STATUS = "nova.status"
TAG_REASON = "nova.reason"
TAG_PARENT = "mlflow.parentRunId"
CONFIG_ARTIFACT = "config.json"
BREAKDOWN_ARTIFACT = "breakdown.json"
TAG_BREAKDOWN = "nova.breakdown"
# Trial statuses whose child run is marked FAILED in MLflow: the trial itself did not complete.
_FAILED_STATUSES = ("failed", "timeout")

# MLflow's limits (mlflow/utils/validation.py): keys match [/\w.\- :]*, are at most 250 characters and
# must not change under posixpath.normpath; param values hold 6000 characters, tag values 8000; one
# log_batch call carries at most 100 params and 100 tags.
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_MAX_KEY_LEN = 250
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000
_BATCH = 100


class TrackingError(RuntimeError):
    """The MLflow store is unreachable, broken, or lacks what was asked for (one-line message)."""


def default_tracking_uri(cwd: str | os.PathLike[str] | None = None) -> str:
    """The store `mlflow ui` (with no flags) opens when started in `cwd` (default: the current directory).

    What MLflow 3.17 does (mlflow/tracking/_tracking_service/utils.py `get_tracking_uri` and
    `_get_default_tracking_uri`, mlflow/cli `server`, of which `ui` is an alias): with no
    MLFLOW_TRACKING_URI, the client and the server both default to `sqlite:///mlflow.db` in the working
    directory, except when `./mlruns` already holds a file store (a numeric experiment directory with a
    meta.yaml), where both keep using that file store. We follow the same rule, and make the path
    absolute as `mlflow.get_tracking_uri()` does, so subprocesses that change directory still agree.
    MLFLOW_TRACKING_URI, when set, wins, as it does for the MLflow client.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    base = os.path.abspath(cwd if cwd is not None else os.getcwd())
    mlruns = Path(base, "mlruns")
    if _holds_file_store(mlruns):
        return mlruns.as_uri()
    return "sqlite:///" + posixpath.abspath(pathname2url(os.path.join(base, "mlflow.db")))


def _holds_file_store(mlruns: Path) -> bool:
    try:
        return any(d.is_dir() and d.name.isdigit() and (d / "meta.yaml").exists() for d in mlruns.iterdir())
    except OSError:
        return False


def _probe_http(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server cannot be reached at all.

    MLflow's client retries a refused connection 7 times with backoff (about 4 minutes) before it gives
    up, which would stall a sweep that could go on with the ledger alone. Any HTTP answer, even an
    error (auth, rate limit), means the server is there; MLflow's own handling then applies.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except OSError as exc:  # URLError, timeouts, resets
        raise TrackingError(f"MLflow at {uri}: server unreachable: {_one_line(exc)}") from exc


@dataclass
class SweepInfo:
    """What the parent run of a sweep holds.

    params: the experiment's settings (non-string values are logged as JSON).
    experiment_text: the experiment file's text, logged as the artifact `experiment_filename`.
    tags: extra parent tags (host, git commit, ...).
    """

    sweep_id: str
    name: str
    baseline_arm: str
    params: Mapping[str, Any]
    experiment_text: str
    experiment_filename: str = "experiment.toml"
    tags: Mapping[str, str] = field(default_factory=dict)


class Tracker:
    """Logs sweeps and trials to one MLflow experiment and reads them back.

    Idempotency holds against what the store held when a sweep was first touched plus what this
    Tracker logged since (one writer per sweep at a time, like the ledger).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "nova-ab",
        artifact_location: str | None = None,
    ) -> None:
        """Connect and get or create the experiment; `artifact_location` only applies to a new one."""
        # MLflow phones home unless told not to; our machines often have no network, and users did not ask.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.uri = tracking_uri or default_tracking_uri()
        self.experiment_name = experiment_name
        self._parents: dict[str, str] = {}  # sweep id -> parent run id
        self._logged: dict[str, set[str]] = {}  # parent run id -> trial ids with a complete child
        _probe_http(self.uri)
        with self._guard("connecting"):
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            experiment = self._client.get_experiment_by_name(experiment_name)
            if experiment is None:
                self._experiment_id = self._client.create_experiment(
                    experiment_name, artifact_location=artifact_location
                )
            elif experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow at {self.uri}: experiment {experiment_name!r} is deleted; restore it "
                    f"(`mlflow experiments restore -x {experiment.experiment_id}`) or use another name"
                )
            else:
                self._experiment_id = experiment.experiment_id

    # -- sweeps ----------------------------------------------------------------------------------------

    def start_sweep(self, info: SweepInfo) -> str:
        """Create the sweep's parent run, or reuse it (found by nova.sweep_id); returns its run id.

        Params and the experiment file are (re)logged on reuse too: same values are a no-op in MLflow,
        and it completes a parent whose creation was interrupted.
        """
        with self._guard(f"starting sweep {info.sweep_id}"):
            run_id = self._find_parent(info.sweep_id)
            if run_id is None:
                run = self._client.create_run(
                    self._experiment_id,
                    run_name=info.name,
                    tags={TAG_KIND: "sweep", TAG_SWEEP_ID: info.sweep_id},
                )
                run_id = run.info.run_id
                self._parents[info.sweep_id] = run_id
            else:
                self._client.update_run(run_id, status="RUNNING")
            tags = {**info.tags, TAG_BASELINE: info.baseline_arm}
            self._log_batch(run_id, params=_params(info.params), tags=_tags(tags))
            self._client.log_text(run_id, info.experiment_text, info.experiment_filename)
            return run_id

    def finish_sweep(self, sweep_id: str, status: str = "FINISHED") -> None:
        """Mark the parent run ended (an MLflow run status: FINISHED, FAILED or KILLED)."""
        with self._guard(f"finishing sweep {sweep_id}"):
            self._client.set_terminated(self._require_parent(sweep_id), status=status)

    def log_plot(self, sweep_id: str, path: str | os.PathLike[str]) -> None:
        """Attach a file (the comparison PNG) to the sweep's parent run, under its own name."""
        with self._guard(f"logging {path}"):
            self._client.log_artifact(self._require_parent(sweep_id), os.fspath(path))

    # -- trials ----------------------------------------------------------------------------------------

    def log_trial(self, record: TrialRecord) -> bool:
        """Log `record` as a child of its sweep's parent run; False when it was already there."""
        with self._guard(f"logging trial {record.trial_id}"):
            parent = self._require_parent(record.sweep_id)
            logged = self._logged_trials(parent)
            if record.trial_id in logged:
                return False
            self._log_child(parent, record)
            logged.add(record.trial_id)
            return True

    def import_ledger(self, path: str | os.PathLike[str], sweep: SweepInfo | None = None) -> int:
        """Log every record of a ledger not yet in the store; returns how many were logged.

        A sweep with no parent run yet (the store was down for the whole sweep) needs `sweep`, the
        SweepInfo of that sweep, to create one; that parent is then marked FINISHED.
        """
        try:
            records = Ledger(path).records()
        except (OSError, LedgerError) as exc:
            raise TrackingError(f"cannot read ledger {path}: {exc}") from exc
        count = 0
        for sweep_id in dict.fromkeys(r.sweep_id for r in records):
            created = False
            with self._guard(f"importing sweep {sweep_id}"):
                if self._find_parent(sweep_id) is None:
                    if sweep is None or sweep.sweep_id != sweep_id:
                        raise TrackingError(
                            f"MLflow at {self.uri}: sweep {sweep_id} has no parent run; "
                            "import it together with its experiment file"
                        )
                    self.start_sweep(sweep)
                    created = True
            count += sum(self.log_trial(r) for r in records if r.sweep_id == sweep_id)
            if created:
                self.finish_sweep(sweep_id)
        return count

    # -- reading back ----------------------------------------------------------------------------------

    def load_sweep(self, sweep: str | None = None) -> tuple[str, str, list[TrialRecord]]:
        """(sweep id, baseline arm, records in schedule order) of a sweep read back from MLflow.

        `sweep` is a sweep id or a parent run name (the most recent sweep of that name); None means
        the most recent sweep of the experiment.
        """
        with self._guard(f"loading sweep {sweep or '(latest)'}"):
            parents = sorted(self._sweep_runs(), key=lambda r: r.info.start_time, reverse=True)
            if sweep is not None:
                parents = [r for r in parents if sweep in (r.data.tags.get(TAG_SWEEP_ID), r.info.run_name)]
            if not parents:
                what = f"no sweep {sweep!r}" if sweep is not None else "no sweeps"
                raise TrackingError(f"MLflow at {self.uri}: experiment {self.experiment_name!r} has {what}")
            parent = parents[0]
            children = [r for r in self._children(parent.info.run_id) if TAG_TRIAL_ID in r.data.tags]
            with tempfile.TemporaryDirectory(prefix="nova-ab-") as tmp, _no_progress_bars():
                records = [self._record_from_run(r, tmp) for r in children]
            records.sort(key=lambda r: (r.order, r.trial_id))
            return parent.data.tags[TAG_SWEEP_ID], parent.data.tags.get(TAG_BASELINE, ""), records

    # -- internals -------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except TrackingError:
            raise
        # Broad on purpose: DB, HTTP, disk and MLflow errors all mean "the store is unusable now".
        except Exception as exc:
            raise TrackingError(f"MLflow at {self.uri}: {action} failed: {_one_line(exc)}") from exc

    def _search(self, filter_string: str) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            page = self._client.search_runs(
                [self._experiment_id], filter_string, max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _sweep_runs(self) -> list[Run]:
        return self._search(f"tags.`{TAG_KIND}` = 'sweep'")

    def _find_parent(self, sweep_id: str) -> str | None:
        if sweep_id not in self._parents:
            # Matched here rather than in the filter so that no sweep id needs quoting. Should a race
            # ever create two parents, the oldest one stays the parent.
            matches = [r for r in self._sweep_runs() if r.data.tags.get(TAG_SWEEP_ID) == sweep_id]
            if not matches:
                return None
            self._parents[sweep_id] = min(matches, key=lambda r: r.info.start_time).info.run_id
        return self._parents[sweep_id]

    def _require_parent(self, sweep_id: str) -> str:
        run_id = self._find_parent(sweep_id)
        if run_id is None:
            raise TrackingError(
                f"MLflow at {self.uri}: sweep {sweep_id} has no parent run (start_sweep first)"
            )
        return run_id

    def _children(self, parent_run_id: str) -> list[Run]:
        return self._search(f"tags.`{TAG_PARENT}` = '{parent_run_id}'")

    def _logged_trials(self, parent_run_id: str) -> set[str]:
        if parent_run_id not in self._logged:
            logged = set()
            for run in self._children(parent_run_id):
                trial_id = run.data.tags.get(TAG_TRIAL_ID)
                if trial_id is None:
                    # nova.trial_id is written last (see _log_child): this child was cut off mid-log.
                    # Delete it (MLflow keeps it restorable) so that its trial is logged again whole.
                    self._client.delete_run(run.info.run_id)
                else:
                    logged.add(trial_id)
            self._logged[parent_run_id] = logged
        return self._logged[parent_run_id]

    def _log_child(self, parent_run_id: str, record: TrialRecord) -> None:
        now = time.time()
        start_ms = _millis(record.started_at or now)
        end_ms = _millis(record.finished_at or now)
        tags = {
            **record.tags,
            TAG_KIND: "trial",
            TAG_SWEEP_ID: record.sweep_id,
            TAG_ARM: record.arm,
            TAG_ARM_PARAMS: json.dumps(record.arm_params, sort_keys=True, default=str),
            TAG_REPEAT: str(record.repeat),
            TAG_ORDER: str(record.order),
            TAG_STATUS: record.status,
        }
        if record.reason is not None:
            tags[TAG_REASON] = record.reason
        if record.breakdown:
            tags[TAG_BREAKDOWN] = BREAKDOWN_ARTIFACT
        run = self._client.create_run(
            self._experiment_id,
            start_time=start_ms,
            tags={TAG_PARENT: parent_run_id},
            run_name=f"{record.arm} #{record.repeat}",
        )
        run_id = run.info.run_id
        from mlflow.entities import Metric

        metrics = [Metric(_key(k), float(v), end_ms, 0) for k, v in record.metrics.items()]
        self._log_batch(run_id, params=_params(record.params), tags=_tags(tags), metrics=metrics)
        self._client.log_dict(run_id, record.config, CONFIG_ARTIFACT)
        if record.breakdown:
            self._client.log_dict(run_id, record.breakdown, BREAKDOWN_ARTIFACT)
        # Last, so that a child with nova.trial_id is known to be complete.
        self._log_batch(run_id, tags=_tags({TAG_TRIAL_ID: record.trial_id}))
        status = "FAILED" if record.status in _FAILED_STATUSES else "FINISHED"
        self._client.set_terminated(run_id, status=status, end_time=end_ms)

    def _log_batch(
        self,
        run_id: str,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        metrics: list[Metric] | None = None,
    ) -> None:
        from mlflow.entities import Param, RunTag

        param_list = [Param(k, v) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        metric_list = metrics or []
        # Chunks of _BATCH of each kind keep every call within MLflow's per-batch limits.
        for i in range(0, max(len(param_list), len(tag_list), len(metric_list), 1), _BATCH):
            self._client.log_batch(
                run_id,
                metrics=metric_list[i : i + _BATCH],
                params=param_list[i : i + _BATCH],
                tags=tag_list[i : i + _BATCH],
            )

    def _record_from_run(self, run: Run, tmp: str) -> TrialRecord:
        tags = run.data.tags
        dst = Path(tmp, run.info.run_id)
        dst.mkdir()
        config_path = self._client.download_artifacts(run.info.run_id, CONFIG_ARTIFACT, str(dst))
        breakdown = {}
        if TAG_BREAKDOWN in tags:
            breakdown = json.loads(
                Path(self._client.download_artifacts(run.info.run_id, tags[TAG_BREAKDOWN], str(dst))).read_text()
            )
        return TrialRecord(
            sweep_id=tags[TAG_SWEEP_ID],
            trial_id=tags[TAG_TRIAL_ID],
            arm=tags[TAG_ARM],
            arm_params=json.loads(tags.get(TAG_ARM_PARAMS, "{}")),
            repeat=int(tags[TAG_REPEAT]),
            order=int(tags[TAG_ORDER]),
            status=tags[TAG_STATUS],  # type: ignore[arg-type]  # written from a Status
            reason=tags.get(TAG_REASON),
            config=json.loads(Path(config_path).read_text()),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags={k: v for k, v in tags.items() if not k.startswith(("nova.", "mlflow."))},
            breakdown=breakdown,
            started_at=run.info.start_time / 1000,
            finished_at=(run.info.end_time or 0) / 1000,
        )


def _key(name: str) -> str:
    """`name` made into a valid MLflow key (bad characters become "_")."""
    key = _BAD_KEY_CHARS.sub("_", name)[:_MAX_KEY_LEN]
    if posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_")
    if key in ("", ".", "..") or key.startswith(".."):
        key = ("_" + key)[:_MAX_KEY_LEN]
    return key


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        out[_key(name)] = text[:_MAX_PARAM_LEN]
    return out


def _tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {_key(k): str(v)[:_MAX_TAG_LEN] for k, v in tags.items()}


def _millis(seconds: float) -> int:
    return int(seconds * 1000)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence MLflow's per-download progress bar (one per child) unless the user chose a setting."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    if name in os.environ:
        yield
        return
    os.environ[name] = "false"
    try:
        yield
    finally:
        del os.environ[name]


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
