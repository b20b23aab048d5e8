"""MLflow logging of sweeps: one parent run per sweep, one child run per trial.

Layout in the experiment:
- parent run, named by the sweep (tags nova.kind=sweep, nova.sweep_id, nova.baseline_arm): params = the
  experiment's settings, artifacts = the experiment file and comparison.png; the summary's metrics and its
  Markdown note (the run's description, tag mlflow.note.content) answer the A/B question.
- child run per trial, named "<arm's short name> · #<repeat>" (tags mlflow.parentRunId, nova.kind=trial,
  nova.trial_id, nova.arm, ...): params, metrics and tags of the TrialRecord, its seeds as tags nova.seed.<name>
  (63-bit: a float metric would round them), artifact config.json = the resolved engine config,
  outputs.json = the timed run's output token ids (one request per line: what the output check verified)
  and, for our engine's trials, breakdown.json = the timed run by step class (tag nova.breakdown names it).
  Its MLflow status is FAILED when the trial did not run to completion
  (nova.status "failed" or "timeout") and FINISHED otherwise; the verdict itself ("ok", "incorrect", ...)
  is always the nova.status tag.
- the workload's recipe is the input dataset of the parent and of every child (the runs table's Datasets
  column), so runs of different calibers are told apart at a glance.

Logging is idempotent: a trial whose child already exists is not logged again, so the runner may log
live and `import_ledger` may replay the whole ledger afterwards; only a record that supersedes its trial's
child (the trial run again, `--rerun-failed`, after a status that is no verdict) replaces it. MLflow is
imported lazily, inside `Tracker`, so trial subprocesses (and a runner whose store is down) never need it;
every store failure surfaces as one `TrackingError` with a one-line message.

Which store, and reaching it within seconds, is novainfer.ab.sweep.mlflow_store's. A sweep that dies leaves its
parent RUNNING until `import_ledger` (`nova-ab import`, or the next `--resume`) touches it.

The ledger is the source of truth: records reach MLflow only after they are in the ledger.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from novainfer.ab.sweep.ledger import RERUNNABLE, Ledger, LedgerError
from novainfer.ab.sweep.mlflow_store import TrackingError, connected, default_tracking_uri, one_line
from novainfer.ab.sweep.names import trial_name
from novainfer.ab.wire import GATE_PREFIX, TrialRecord

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput, Metric, Run

TAG_KIND = "nova.kind"
TAG_SWEEP_ID = "nova.sweep_id"
TAG_BASELINE = "nova.baseline_arm"
TAG_TRIAL_ID = "nova.trial_id"
TAG_ARM = "nova.arm"
TAG_ARM_NAME = "nova.arm_name"
TAG_ARM_PARAMS = "nova.arm_params"
TAG_REPEAT = "nova.repeat"
TAG_ORDER = "nova.order"
TAG_STATUS = "nova.status"
TAG_REASON = "nova.reason"
TAG_THROTTLED = "nova.throttled"  # TrialRecord.throttled: the GPU's heat or power throttle reasons in the timed window
TAG_PARENT = "mlflow.parentRunId"
# MLflow's standard source tags (mlflow/utils/mlflow_tags.py), which its UI shows and its own runs carry. A trial's
# record keeps the ledger's "git_commit" ("<sha>", "<sha>-dirty" for a checkout with local changes, or "unknown");
# the store gets the sha alone, as MLflow's git context logs it, the changes as nova.git_dirty, and no commit
# where there is none (a sweep outside a checkout). Reading a run back joins them again.
RECORD_GIT_COMMIT = "git_commit"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "nova.git_dirty"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_NOTE = "mlflow.note.content"  # MLflow shows it as the run's Markdown description
CONFIG_ARTIFACT = "config.json"
# MLflow's UI keeps a shared runs-table view in an experiment tag of this prefix (mlflow/server/js, "share view").
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
# The trials' metrics a sweep's view shows as columns: throughput, then what "verified" covered (output tokens
# checked and outside the reference's margin, planned steps the gate replayed, its worst row), then the caliber.
VIEW_TRIAL_METRICS = (
    "output_tok_s", "output_tokens_checked", "output_tokens_outside", "gate_steps", "max_rel_err", "requests_off",
    "gpu_throttled",
)
# And as its charts, throughput first: the counts of what was checked are the same bar for every honest trial.
VIEW_TRIAL_CHARTS = ("output_tok_s", "output_tokens_outside", "max_rel_err", "requests_off")
OUTPUTS_ARTIFACT = "outputs.json"
TAG_SEED_PREFIX = "nova.seed."
BREAKDOWN_ARTIFACT = "breakdown.json"
TAG_BREAKDOWN = "nova.breakdown"
PLOT_ARTIFACT = "comparison.png"
DATASET_SOURCE_TYPE = "nova-ab"
# The workload's recipe keys shown as the dataset's profile.
_PROFILE_KEYS = ("num_seqs", "output_tokens")
# The MLflow run statuses a sweep's parent may end with.
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Trial statuses whose child run is marked FAILED in MLflow: the trial itself did not complete.
_FAILED_STATUSES = ("failed", "timeout")
# A child run's metrics in this order, then the rest as the trial reported them with the gate's per-kind coverage
# last: MLflow's run page lists them in the order they were logged, and a trial has about 70.
HEADLINE_METRICS = (
    "output_tok_s", "total_tok_s", "run_seconds", "requests_off", "output_tokens_checked", "output_tokens_outside",
    "max_rel_err", "gpu_throttled",
)
# TrialRecord.telemetry's series, logged as the history (one step per sample) of these metrics.
TELEMETRY_SERIES = {
    "sm_clock_mhz": "gpu_sm_clock_mhz", "mem_clock_mhz": "gpu_mem_clock_mhz", "temperature_c": "gpu_temperature_c",
    "power_w": "gpu_power_w",
}

# MLflow's limits (mlflow/utils/validation.py): keys match [/\w.\- :]*, are at most 250 characters and
# must not change under posixpath.normpath; param values hold 6000 characters, tag values 8000; one
# log_batch call carries at most 100 params and 100 tags.
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_MAX_KEY_LEN = 250
_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 8000
_BATCH = 100


@dataclass
class SweepInfo:
    """What the parent run of a sweep holds.

    sweep_id: the sweep's identity (nova.sweep_id of the parent and of every child).
    name: the parent run's name.
    params: the experiment's settings (non-string values are logged as JSON).
    experiment_text: the experiment file's text, logged as the artifact `experiment_filename`.
    tags: extra parent tags (host, git commit, ...).
    arm_names: arm label -> the short name its child runs are named by ("cudnn · bt=64"); an arm without
        one keeps its label. Empty in a sweep.json written before names existed.
    workload: the workload's recipe (name, num_seqs, input_len, output_len, seed, output_tokens), logged as
        the input dataset of the parent and of every child; empty: no dataset.
    order_seed: the seed of the arms' order within each repeat block (experiment.plan_trials), so --resume plans
        the same order; None: the file's order (a sweep from before the order was drawn).
    """

    sweep_id: str
    name: str
    baseline_arm: str
    params: Mapping[str, Any]
    experiment_text: str
    experiment_filename: str = "experiment.toml"
    tags: Mapping[str, str] = field(default_factory=dict)
    arm_names: dict[str, str] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    order_seed: int | None = None


@dataclass(frozen=True)
class _Child:
    """A trial's logged child run: what deciding whether a record supersedes it needs."""

    run_id: str
    status: str  # the record's (nova.status)
    end_ms: int  # the record's finished_at


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
        create: bool = True,
    ) -> None:
        """Connect and get the experiment, creating it (and the store) unless `create` is False.

        `artifact_location` only applies to a new experiment. With `create` False (reading, as `nova-ab
        compare` does) a missing store or experiment is a TrackingError, and nothing is created.
        """
        # MLflow phones home unless told not to; our machines often have no network, and users did not ask.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.uri = tracking_uri or default_tracking_uri()
        self.experiment_name = experiment_name
        self._parents: dict[str, str] = {}  # sweep id -> parent run id
        self._logged: dict[str, dict[str, _Child]] = {}  # parent run id -> trial id -> its complete child
        self._sweeps: dict[str, SweepInfo] = {}  # sweep id -> its info, where known (names children)
        self._live: set[str] = set()  # sweeps started here and not finished: their parent stays RUNNING
        with self._guard("connecting"), connected(self.uri, create) as client:
            self._client: Any = client
            self._experiment_id = self._get_experiment(artifact_location, create)

    # -- sweeps ----------------------------------------------------------------------------------------

    def start_sweep(self, info: SweepInfo) -> str:
        """Create the sweep's parent run, or reuse it (found by nova.sweep_id) and mark it RUNNING again;
        returns its run id. Trials logged from here on are named by `info.arm_names`.

        Name, params, the experiment file and the workload are (re)logged on reuse too: same values are a
        no-op in MLflow, and it completes a parent whose creation was interrupted.
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
                self._client.update_run(run_id, status="RUNNING", name=info.name)
            self._sweeps[info.sweep_id] = info
            self._live.add(info.sweep_id)
            tags = {**info.tags, TAG_BASELINE: info.baseline_arm}
            self._log_batch(run_id, params=_params(info.params), tags=_tags(tags))
            self._client.log_text(run_id, info.experiment_text, info.experiment_filename)
            self._log_workload(run_id, info)
            return run_id

    def finish_sweep(self, sweep_id: str, status: str = "FINISHED") -> None:
        """Mark the parent run ended: FINISHED (it ran through), KILLED (interrupted, e.g. Ctrl-C) or FAILED."""
        if status not in RUN_END_STATUSES:
            raise ValueError(f"finish_sweep status must be one of {', '.join(RUN_END_STATUSES)}, got {status!r}")
        with self._guard(f"finishing sweep {sweep_id}"):
            self._client.set_terminated(self._require_parent(sweep_id), status=status)
            self._live.discard(sweep_id)

    def log_summary(
        self,
        sweep_id: str,
        metrics: Mapping[str, float],
        note: str,
        png: str | os.PathLike[str] | None = None,
    ) -> None:
        """The sweep's answer on its parent run: `metrics`, `note` as the run's Markdown description, and
        `png` (when given) as the artifact comparison.png.

        A later call replaces the description and the plot and adds a newer value of each metric (MLflow
        shows the latest), so a resumed sweep's summary supersedes the earlier one.
        """
        with self._guard(f"logging the summary of sweep {sweep_id}"):
            run_id = self._require_parent(sweep_id)
            from mlflow.entities import Metric

            now = _millis(time.time())
            summary = [Metric(_key(k), float(v), now, 0) for k, v in metrics.items()]
            self._log_batch(run_id, tags=_tags({TAG_NOTE: note}), metrics=summary)
            if png is not None:
                # log_artifact names the artifact after the file; an artifact of the same path is overwritten,
                # in a local artifact root (a copy) as on an HTTP artifact server (a PUT).
                with tempfile.TemporaryDirectory(prefix="nova-ab-") as tmp:
                    plot = shutil.copyfile(png, Path(tmp, PLOT_ARTIFACT))
                    self._client.log_artifact(run_id, str(plot))

    def share_view(self, sweep_id: str, summary_columns: Sequence[str]) -> str:
        """Save this sweep's runs as an MLflow shared view and return the UI route that opens it.

        The view lists the sweep's runs only. Its table shows each run's description (the parent's: the
        verdict), dataset (the caliber), `summary_columns` (the parent's per-arm metrics), and, on the trials
        (children), VIEW_TRIAL_METRICS (throughput, what the checks covered, requests off their length) and the
        status: the A/B answer in the first row, no clicks. Its charts put throughput first. MLflow's UI keeps
        such a view as an experiment tag (SHARED_VIEW_PREFIX + key) and opens it from `?viewStateShareKey=<key>`;
        the key is the parent run's id.
        """
        metric = lambda key: f"metrics.`{_key(key)}`"  # noqa: E731 (MLflow UI's column keys)
        section = "nova-ab"
        charts = [
            {"uuid": f"nova-ab-{key}", "type": "BAR", "runsCountToCompare": 100, "metricSectionId": section,
             "deleted": False, "isGenerated": False, "metricKey": key}
            for key in VIEW_TRIAL_CHARTS
        ]
        state = {
            "searchFilter": f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}'",
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
            "selectedColumns": [
                "attributes.`Description`", "attributes.`Dataset`", *map(metric, summary_columns),
                *map(metric, VIEW_TRIAL_METRICS), f"tags.`{TAG_STATUS}`",
            ],
            "compareRunSections": [
                {"uuid": section, "name": "nova-ab", "display": True, "isReordered": True, "deleted": False,
                 "isGenerated": False},
            ],
            "compareRunCharts": charts,
        }
        with self._guard(f"sharing the view of sweep {sweep_id}"):
            parent = self._require_parent(sweep_id)
            self._client.set_experiment_tag(self._experiment_id, f"{SHARED_VIEW_PREFIX}{parent}", json.dumps(state))
            return f"#/experiments/{self._experiment_id}/runs?viewStateShareKey={parent}"

    # -- trials ----------------------------------------------------------------------------------------

    def log_trial(self, record: TrialRecord) -> bool:
        """Log `record` as a child of its sweep's parent run; False when it was already there. A record that
        supersedes its trial's child (the trial run again after a RERUNNABLE status, `--rerun-failed`, ending
        later) replaces it: the old child is deleted (MLflow keeps it restorable)."""
        with self._guard(f"logging trial {record.trial_id}"):
            parent = self._require_parent(record.sweep_id)
            logged = self._logged_trials(parent)
            earlier = logged.get(record.trial_id)
            if earlier is not None:
                if earlier.status not in RERUNNABLE or _millis(record.finished_at) <= earlier.end_ms:
                    return False
                self._client.delete_run(earlier.run_id)
            logged[record.trial_id] = self._log_child(parent, record)
            return True

    def import_ledger(self, path: str | os.PathLike[str], sweep: SweepInfo | None = None) -> int:
        """Log every record of a ledger not yet in the store; returns how many were logged.

        `sweep`, the SweepInfo of the ledger's sweep (its sweep.json), names the children and creates the
        parent of a sweep that has none yet (the store was down for the whole sweep). A parent of a sweep not
        started by this Tracker is marked FINISHED when it is still RUNNING: the sweep that ran it died
        (a live sweep first calls start_sweep on its own Tracker, and that parent is left as it is).
        """
        try:
            records = Ledger(path).records()
        except (OSError, LedgerError) as exc:
            raise TrackingError(f"cannot read ledger {path}: {exc}") from exc
        count = 0
        for sweep_id in dict.fromkeys(r.sweep_id for r in records):
            mine = [r for r in records if r.sweep_id == sweep_id]
            live = sweep_id in self._live
            with self._guard(f"importing sweep {sweep_id}"):
                if sweep is not None and sweep.sweep_id == sweep_id:
                    self._sweeps.setdefault(sweep_id, sweep)
                if self._find_parent(sweep_id) is None:
                    if sweep is None or sweep.sweep_id != sweep_id:
                        raise TrackingError(
                            f"MLflow at {self.uri}: sweep {sweep_id} has no parent run; "
                            "import it together with its experiment file"
                        )
                    self.start_sweep(sweep)
            count += sum(self.log_trial(r) for r in mine)
            if not live:
                self._end_if_running(sweep_id, max(r.finished_at for r in mine))
        return count

    # -- reading back ----------------------------------------------------------------------------------

    def load_sweep(self, sweep: str | None = None) -> tuple[str, str, list[TrialRecord]]:
        """(sweep id, baseline arm, records in schedule order) of a sweep read back from MLflow.

        `sweep` is a sweep id or a parent run name (the most recent sweep of that name); None means
        the most recent sweep of the experiment. The records carry no outputs: the comparison does not read
        them, and one more download per trial would slow it down (each child's outputs.json holds them).
        """
        with self._guard(f"loading sweep {sweep or '(latest)'}"):
            parent = self._pick_sweep(sweep)
            children = [r for r in self._children(parent.info.run_id) if TAG_TRIAL_ID in r.data.tags]
            with tempfile.TemporaryDirectory(prefix="nova-ab-") as tmp, _no_progress_bars():
                records = [self._record_from_run(r, tmp) for r in children]
            records.sort(key=lambda r: (r.order, r.trial_id))
            return parent.data.tags[TAG_SWEEP_ID], parent.data.tags.get(TAG_BASELINE, ""), records

    def sweep_link(self, sweep: str | None = None) -> tuple[str, str, str]:
        """(parent run name, sweep id, UI route) of a sweep (`sweep` as in load_sweep): the route of the view the
        sweep shared (share_view), else of its parent run's page; prefix it with the UI's address."""
        with self._guard(f"finding sweep {sweep or '(latest)'}"):
            parent = self._pick_sweep(sweep)
            run_id = parent.info.run_id
            views = self._client.get_experiment(self._experiment_id).tags
            route = (
                f"#/experiments/{self._experiment_id}/runs?viewStateShareKey={run_id}"
                if f"{SHARED_VIEW_PREFIX}{run_id}" in views
                else f"#/experiments/{self._experiment_id}/runs/{run_id}"
            )
            return parent.info.run_name, parent.data.tags[TAG_SWEEP_ID], route

    # -- internals -------------------------------------------------------------------------------------

    def _pick_sweep(self, sweep: str | None) -> Run:
        """The parent run of sweep id or parent run name `sweep` (the latest of that name), or of the latest."""
        parents = sorted(self._sweep_runs(), key=lambda r: r.info.start_time, reverse=True)
        if sweep is not None:
            parents = [r for r in parents if sweep in (r.data.tags.get(TAG_SWEEP_ID), r.info.run_name)]
        if not parents:
            what = f"no sweep {sweep!r}" if sweep is not None else "no sweeps"
            raise TrackingError(f"MLflow at {self.uri}: experiment {self.experiment_name!r} has {what}")
        return parents[0]

    def _get_experiment(self, artifact_location: str | None, create: bool) -> str:
        """The experiment's id; created when missing (and `create`). Should another Tracker create it at the
        same moment, its experiment is used."""
        from mlflow.exceptions import MlflowException

        for attempt in range(2):
            experiment = self._client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                break
            if not create:
                raise TrackingError(f"no experiment {self.experiment_name!r} in {self.uri}")
            try:
                return self._client.create_experiment(self.experiment_name, artifact_location=artifact_location)
            except MlflowException as exc:
                if attempt or exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow at {self.uri}: experiment {self.experiment_name!r} is deleted; restore it "
                f"(`mlflow experiments restore -x {experiment.experiment_id}`) or use another name"
            )
        return experiment.experiment_id

    def _end_if_running(self, sweep_id: str, finished_at: float) -> None:
        """Mark a parent left RUNNING FINISHED, ended when its last trial did (`finished_at`, else now)."""
        with self._guard(f"finishing sweep {sweep_id}"):
            run_id = self._require_parent(sweep_id)
            if self._client.get_run(run_id).info.status == "RUNNING":
                self._client.set_terminated(run_id, status="FINISHED", end_time=_millis(finished_at or time.time()))

    def _log_workload(self, run_id: str, info: SweepInfo) -> None:
        if info.workload:
            self._client.log_inputs(run_id, datasets=[_workload_input(info.workload)])

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except TrackingError:
            raise
        # Broad on purpose: DB, HTTP, disk and MLflow errors all mean "the store is unusable now".
        except Exception as exc:
            raise TrackingError(f"MLflow at {self.uri}: {action} failed: {one_line(exc)}") from exc

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

    def _logged_trials(self, parent_run_id: str) -> dict[str, _Child]:
        if parent_run_id not in self._logged:
            logged = {}
            for run in self._children(parent_run_id):
                trial_id = run.data.tags.get(TAG_TRIAL_ID)
                if trial_id is None:
                    # nova.trial_id is written last (see _log_child): this child was cut off mid-log.
                    # Delete it (MLflow keeps it restorable) so that its trial is logged again whole.
                    self._client.delete_run(run.info.run_id)
                else:
                    logged[trial_id] = _Child(run.info.run_id, run.data.tags.get(TAG_STATUS, ""), run.info.end_time)
            self._logged[parent_run_id] = logged
        return self._logged[parent_run_id]

    def _log_child(self, parent_run_id: str, record: TrialRecord) -> _Child:
        now = time.time()
        start_ms = _millis(record.started_at or now)
        end_ms = _millis(record.finished_at or now)
        tags = {
            **_source_tags(record.tags),
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
        if record.throttled:
            tags[TAG_THROTTLED] = record.throttled
        tags.update({TAG_SEED_PREFIX + name: str(seed) for name, seed in record.seeds.items()})
        info = self._sweeps.get(record.sweep_id)
        if info is not None:  # "group by nova.arm_name" in MLflow's UI then reads "bt=64", not the whole label
            tags[TAG_ARM_NAME] = info.arm_names.get(record.arm, record.arm)
        run = self._client.create_run(
            self._experiment_id,
            start_time=start_ms,
            tags={TAG_PARENT: parent_run_id},
            run_name=self._child_name(record),
        )
        run_id = run.info.run_id
        from mlflow.entities import Metric

        metrics = [Metric(_key(k), float(v), end_ms, 0) for k, v in _headline_first(record.metrics)]
        metrics += _series_metrics(record.telemetry, start_ms)
        self._log_batch(run_id, params=_params(record.params), tags=_tags(tags), metrics=metrics)
        if info is not None:
            self._log_workload(run_id, info)
        self._client.log_dict(run_id, record.config, CONFIG_ARTIFACT)
        if record.breakdown:
            self._client.log_dict(run_id, record.breakdown, BREAKDOWN_ARTIFACT)
        if record.outputs:
            # One request per line: log_dict's indented JSON would give every token id a line of its own.
            lines = ",\n".join(json.dumps(tokens, separators=(",", ":")) for tokens in record.outputs)
            self._client.log_text(run_id, f"[\n{lines}\n]\n", OUTPUTS_ARTIFACT)
        # Last, so that a child with nova.trial_id is known to be complete.
        self._log_batch(run_id, tags=_tags({TAG_TRIAL_ID: record.trial_id}))
        status = "FAILED" if record.status in _FAILED_STATUSES else "FINISHED"
        self._client.set_terminated(run_id, status=status, end_time=end_ms)
        return _Child(run_id, record.status, end_ms)

    def _child_name(self, record: TrialRecord) -> str:
        """"<arm's short name> · #<repeat>" where the sweep's arm names are known, else "<arm label> #<repeat>".

        Short names stand only where unique in the sweep, so that child names are unique too.
        """
        info = self._sweeps.get(record.sweep_id)
        names = info.arm_names if info is not None else {}
        short = names.get(record.arm)
        if short is None or list(names.values()).count(short) > 1:
            return f"{record.arm} #{record.repeat}"
        return trial_name(short, record.repeat)

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
            # Less the telemetry series, whose latest points MLflow reports as metrics (the record keeps them apart).
            metrics={k: v for k, v in run.data.metrics.items() if k not in TELEMETRY_SERIES.values()},
            tags={**{k: v for k, v in tags.items() if not k.startswith(("nova.", "mlflow."))}, **_record_source(tags)},
            breakdown=breakdown,
            seeds={k.removeprefix(TAG_SEED_PREFIX): int(v) for k, v in tags.items() if k.startswith(TAG_SEED_PREFIX)},
            throttled=tags.get(TAG_THROTTLED),
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


def _headline_first(metrics: Mapping[str, float]) -> list[tuple[str, float]]:
    """The metrics in logging order: HEADLINE_METRICS, then the others, the gate's per-kind coverage last."""
    rank = {name: i for i, name in enumerate(HEADLINE_METRICS)}
    return sorted(
        metrics.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0].startswith(GATE_PREFIX))
    )


def _series_metrics(series: Mapping[str, list[float]], start_ms: int) -> list[Metric]:
    """The trial's GPU telemetry series as metric histories: step = the sample's index, timestamp = its time
    (the window's seconds counted from the run's start), so MLflow charts them over the trial."""
    from mlflow.entities import Metric

    times = series.get("t_s", [])
    return [
        Metric(key, float(value), start_ms + _millis(t), step)
        for name, key in TELEMETRY_SERIES.items()
        for step, (t, value) in enumerate(zip(times, series.get(name, [])))
    ]


def _source_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """A record's tags as logged: its git_commit as MLflow's source tags (see TAG_GIT_COMMIT)."""
    out = {k: v for k, v in tags.items() if k != RECORD_GIT_COMMIT}
    commit = tags.get(RECORD_GIT_COMMIT, "unknown")
    if commit != "unknown":
        sha = commit.removesuffix("-dirty")
        out |= {TAG_GIT_COMMIT: sha, TAG_SOURCE_TYPE: "LOCAL", TAG_SOURCE_NAME: "nova-ab"}
        if sha != commit:
            out[TAG_GIT_DIRTY] = "true"
    return out


def _record_source(tags: Mapping[str, str]) -> dict[str, str]:
    """The record's git_commit from a run's source tags (the inverse of _source_tags); none where it has none."""
    if TAG_GIT_COMMIT not in tags:
        return {}
    return {RECORD_GIT_COMMIT: tags[TAG_GIT_COMMIT] + ("-dirty" if tags.get(TAG_GIT_DIRTY) == "true" else "")}


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for name, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        out[_key(name)] = text[:_MAX_PARAM_LEN]
    return out


def _tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {_key(k): str(v)[:_MAX_TAG_LEN] for k, v in tags.items()}


def _workload_input(recipe: Mapping[str, Any]) -> DatasetInput:
    """The workload's recipe as an MLflow input dataset: digest = a hash of the recipe, source = the recipe."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = json.dumps(recipe, sort_keys=True, default=str)
    dataset = Dataset(
        name=str(recipe.get("name") or "workload"),
        digest=hashlib.sha256(source.encode()).hexdigest()[:8],
        source_type=DATASET_SOURCE_TYPE,
        source=source,
        profile=json.dumps({k: recipe[k] for k in _PROFILE_KEYS if k in recipe}),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "workload")])


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
