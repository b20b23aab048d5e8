"""MLflow tracking against a real SQLite store in a temp dir: parents, idempotent children, imports, the
sweep's summary, named children and workload datasets, and read-only access that creates nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novainfer.ab.sweep.ledger import Ledger
from novainfer.ab.sweep.tracking import SweepInfo, Tracker, TrackingError, default_tracking_uri
from novainfer.ab.wire import TrialRecord


@pytest.fixture(scope="module", autouse=True)
def _offline_mlflow() -> Iterator[None]:
    # MLflow reads this each time it would send telemetry; the test machine has no network anyway.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Anything MLflow would write relative to the working directory lands in the test's temp dir.
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(tracking URI, artifact location) of one SQLite store shared by the module (creating one is slow)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/mlflow.db", str(root / "artifacts")


@pytest.fixture(scope="module")
def tracker(store: tuple[str, str]) -> Tracker:
    uri, artifacts = store
    return Tracker(uri, "nova-test", artifact_location=artifacts)


def _client(store: tuple[str, str]) -> Any:  # an mlflow.MlflowClient; MLflow is imported lazily
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store[0])


WORKLOAD = {"name": "tiny", "num_seqs": 4, "input_len": [8, 16], "output_len": [4, 8], "seed": 0, "output_tokens": 23}


def _sweep(sweep_id: str, name: str | None = None, **extra: Any) -> SweepInfo:
    return SweepInfo(
        sweep_id=sweep_id,
        name=name or f"sweep-{sweep_id}",
        baseline_arm="backend=native",
        params={"sweep.repeats": 3, "engine.max_num_seqs": 64, "sweep.axes": {"backend": ["native", "x"]}},
        experiment_text='[sweep]\nrepeats = 3\nbaseline = "backend=native"\n',
        tags={"host": "test"},
        **extra,
    )


def _record(sweep_id: str, arm: str, repeat: int, status: str = "ok", tok_s: float = 100.0) -> TrialRecord:
    return TrialRecord(
        sweep_id=sweep_id,
        trial_id=f"{arm}#{repeat}",
        arm=arm,
        arm_params={"backend": arm.split("=")[1]},
        repeat=repeat,
        order=repeat * 2 + (arm != "backend=native"),
        status=status,  # type: ignore[arg-type]
        reason=None if status == "ok" else f"{status} on purpose",
        config={"backend": arm.split("=")[1], "block_size": 16, "backend_options": {"a": [1, 2]}},
        params={"backend": arm.split("=")[1], "torch_version": "2.12.0"},
        metrics={"output_tok_s": tok_s, "run_seconds": 2.5, "phase_attention_s": 1.0},
        tags={"device": "cpu"},
        breakdown={"decode-b4": {"steps": 7.0, "attention_ms": 0.25}} if status == "ok" else {},
        started_at=1_700_000_000.0 + repeat,
        finished_at=1_700_000_002.5 + repeat,
    )


def _children(store: tuple[str, str], parent_id: str) -> list[Any]:
    client = _client(store)
    experiment = client.get_experiment_by_name("nova-test")
    return client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000
    )


def test_default_uri_follows_installed_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == mlflow.get_tracking_uri()
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    # An existing ./mlruns file store keeps being used, by MLflow and by us.
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    assert default_tracking_uri() == mlflow.get_tracking_uri() == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_tracking_uri() == "http://tracking:5000"


def test_parent_run_is_created_once(tracker: Tracker, store: tuple[str, str]) -> None:
    first = tracker.start_sweep(_sweep("p1"))
    again = Tracker(store[0], "nova-test").start_sweep(_sweep("p1"))
    assert first == again
    client = _client(store)
    parents = client.search_runs(
        [tracker._experiment_id], "tags.`nova.sweep_id` = 'p1' and tags.`nova.kind` = 'sweep'"
    )
    assert [r.info.run_id for r in parents] == [first]
    run = parents[0]
    assert run.info.run_name == "sweep-p1"
    assert run.data.params["sweep.repeats"] == "3"
    assert run.data.params["sweep.axes"] == '{"backend": ["native", "x"]}'
    assert run.data.tags["nova.baseline_arm"] == "backend=native"
    assert run.data.tags["host"] == "test"
    assert [a.path for a in client.list_artifacts(first)] == ["experiment.toml"]
    tracker.finish_sweep("p1")
    assert client.get_run(first).info.status == "FINISHED"


def test_trial_is_logged_once(tracker: Tracker, store: tuple[str, str]) -> None:
    parent = tracker.start_sweep(_sweep("t1"))
    record = _record("t1", "backend=native", 0)
    assert tracker.log_trial(record) is True
    assert tracker.log_trial(record) is False
    # A fresh Tracker (a resumed sweep, or `nova-ab import`) finds the child in the store.
    assert Tracker(store[0], "nova-test").log_trial(record) is False

    children = _children(store, parent)
    assert len(children) == 1
    child = children[0]
    assert child.info.run_name == "backend=native #0"
    assert child.info.status == "FINISHED"
    assert child.info.start_time == 1_700_000_000_000 and child.info.end_time == 1_700_000_002_500
    assert child.data.params == record.params
    assert child.data.metrics == record.metrics
    tags = child.data.tags
    assert tags["nova.trial_id"] == "backend=native#0"
    assert tags["nova.arm"] == "backend=native"
    assert tags["nova.status"] == "ok"
    assert tags["nova.sweep_id"] == "t1"
    assert tags["nova.repeat"] == "0"
    assert tags["device"] == "cpu"
    assert "nova.reason" not in tags
    config = _client(store).download_artifacts(child.info.run_id, "config.json")
    assert Path(config).read_text().startswith("{") and '"block_size": 16' in Path(config).read_text()


# Seeds are 63-bit: as a float metric the first would round to 2**62, the second to 2**63.
SEEDS = {"tokens": 2**62 + 12345, "gate_sample": 2**63 - 1}
OUTPUTS = [[151643, 0, 17], [], [42] * 300]
CHECKS = {"output_tokens_produced": 303, "output_tokens_checked": 303, "output_tokens_outside": 0, "gate_steps": 12}


def _checked_record(sweep_id: str, arm: str, repeat: int) -> TrialRecord:
    """A record of a trial both checks ran on: its seeds, every request's output token ids, the checks' metrics."""
    record = _record(sweep_id, arm, repeat)
    record.seeds, record.outputs = dict(SEEDS), [list(o) for o in OUTPUTS]
    record.metrics.update(CHECKS)
    return record


def test_child_holds_the_outputs_and_the_seeds(tracker: Tracker, store: tuple[str, str], tmp_path: Path) -> None:
    parent = tracker.start_sweep(_sweep("o1"))
    tracker.log_trial(_checked_record("o1", "backend=native", 0))
    tracker.log_trial(_record("o1", "backend=x", 0))  # as in a ledger of before the output check
    by_arm = {r.data.tags["nova.arm"]: r for r in _children(store, parent)}
    client = _client(store)

    checked = by_arm["backend=native"]
    assert {k: v for k, v in checked.data.tags.items() if k.startswith("nova.seed.")} == {
        "nova.seed.tokens": str(2**62 + 12345), "nova.seed.gate_sample": str(2**63 - 1),
    }
    assert not any(key.startswith("seed") for key in checked.data.metrics)
    assert {k: checked.data.metrics[k] for k in CHECKS} == CHECKS
    path = Path(client.download_artifacts(checked.info.run_id, "outputs.json", str(tmp_path)))
    assert json.loads(path.read_text()) == OUTPUTS
    assert len(path.read_text().splitlines()) == len(OUTPUTS) + 2  # one request per line between the brackets

    old = by_arm["backend=x"]
    assert "outputs.json" not in {a.path for a in client.list_artifacts(old.info.run_id)}
    assert not any(key.startswith("nova.seed.") for key in old.data.tags)


def test_records_read_back_keep_their_seeds_but_not_their_outputs(store: tuple[str, str]) -> None:
    tracker = Tracker(store[0], "nova-seeds", artifact_location=f"{store[1]}-seeds")
    tracker.start_sweep(_sweep("s1"))
    records = [_checked_record("s1", "backend=native", 0), _record("s1", "backend=x", 0)]
    for record in records:
        tracker.log_trial(record)
    loaded = Tracker(store[0], "nova-seeds", create=False).load_sweep("s1")[2]
    # The comparison needs no outputs (outputs.json holds them); the seeds come back exact, from their tags.
    assert loaded == [dataclasses.replace(r, outputs=[]) for r in records]
    assert loaded[0].seeds == SEEDS and loaded[1].seeds == {}


def test_the_sweeps_view_shows_what_verified_covered(tracker: Tracker, store: tuple[str, str]) -> None:
    parent = tracker.start_sweep(_sweep("v1"))
    route = tracker.share_view("v1", ["native: tokens_checked"])
    assert route.endswith(f"viewStateShareKey={parent}")
    experiment = _client(store).get_experiment_by_name("nova-test")
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{parent}"])
    columns = view["selectedColumns"]
    checks = ["output_tokens_checked", "output_tokens_outside", "gate_steps", "max_rel_err"]
    assert [c for c in columns if c.startswith("metrics.")] == [
        "metrics.`native: tokens_checked`", "metrics.`output_tok_s`", *(f"metrics.`{m}`" for m in checks),
        "metrics.`requests_off`", "metrics.`gpu_throttled`",  # and whether the GPU held the trial down
    ]
    charts = [chart["metricKey"] for chart in view["compareRunCharts"]]
    assert charts[0] == "output_tok_s" and "output_tokens_outside" in charts  # throughput first


def test_failed_trial_is_marked_failed(tracker: Tracker, store: tuple[str, str]) -> None:
    parent = tracker.start_sweep(_sweep("f1"))
    tracker.log_trial(_record("f1", "backend=x", 0, status="timeout"))
    tracker.log_trial(_record("f1", "backend=x", 1, status="incorrect"))
    by_trial = {r.data.tags["nova.trial_id"]: r for r in _children(store, parent)}
    assert by_trial["backend=x#0"].info.status == "FAILED"
    assert by_trial["backend=x#0"].data.tags["nova.reason"] == "timeout on purpose"
    # An incorrect trial ran to completion: MLflow says FINISHED, our verdict is in nova.status.
    assert by_trial["backend=x#1"].info.status == "FINISHED"
    assert by_trial["backend=x#1"].data.tags["nova.status"] == "incorrect"


def test_keys_and_values_are_made_valid(tracker: Tracker, store: tuple[str, str]) -> None:
    parent = tracker.start_sweep(_sweep("k1"))
    record = _record("k1", "backend=native", 0)
    record.params = {"backend_options[heads]": "8", "long": "v" * 7000, "../up": "x"}
    record.tags = {"what?": "t" * 9000}
    assert tracker.log_trial(record)
    (child,) = _children(store, parent)
    assert child.data.params["backend_options_heads_"] == "8"
    assert len(child.data.params["long"]) == 6000
    assert child.data.params["_../up"] == "x"
    assert len(child.data.tags["what_"]) == 8000


@pytest.mark.parametrize(
    ("commit", "logged"),
    [
        ("0123abcd", {"mlflow.source.git.commit": "0123abcd", "mlflow.source.type": "LOCAL"}),
        ("0123abcd-dirty", {"mlflow.source.git.commit": "0123abcd", "nova.git_dirty": "true"}),
        ("unknown", {}),  # outside a checkout: no commit rather than a word in the commit's place
    ],
)
def test_the_git_commit_is_mlflows_source_tag_and_reads_back(
    tracker: Tracker, store: tuple[str, str], commit: str, logged: dict[str, str]
) -> None:
    sweep_id = f"g-{commit}"
    parent = tracker.start_sweep(_sweep(sweep_id))
    record = _record(sweep_id, "backend=native", 0)
    record.tags = {"device": "cpu", "git_commit": commit}
    assert tracker.log_trial(record)
    (child,) = _children(store, parent)
    tags = child.data.tags
    assert "git_commit" not in tags
    assert {k: tags[k] for k in logged} == logged
    assert ("mlflow.source.git.commit" in tags) == bool(logged)
    assert ("nova.git_dirty" in tags) == commit.endswith("-dirty")
    _, _, (back,) = Tracker(store[0], "nova-test").load_sweep(sweep_id)
    assert back.tags == ({"device": "cpu"} if commit == "unknown" else record.tags)


def test_interrupted_child_is_replaced(tracker: Tracker, store: tuple[str, str]) -> None:
    parent = tracker.start_sweep(_sweep("i1"))
    client = _client(store)
    # What a crash between create_run and the final nova.trial_id tag leaves behind.
    client.create_run(tracker._experiment_id, tags={"mlflow.parentRunId": parent, "nova.kind": "trial"})
    assert Tracker(store[0], "nova-test").log_trial(_record("i1", "backend=native", 0))
    children = _children(store, parent)
    assert [r.data.tags.get("nova.trial_id") for r in children] == ["backend=native#0"]


def test_import_ledger_twice_adds_nothing(tracker: Tracker, store: tuple[str, str], tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    records = [_record("l1", arm, r) for r in range(3) for arm in ("backend=native", "backend=x")]
    for record in records:
        ledger.append(record)
    tracker.start_sweep(_sweep("l1"))
    tracker.log_trial(records[0])  # logged live before the store went away

    assert Tracker(store[0], "nova-test").import_ledger(ledger.path) == len(records) - 1
    assert Tracker(store[0], "nova-test").import_ledger(ledger.path) == 0
    parent = tracker.start_sweep(_sweep("l1"))
    trial_ids = sorted(r.data.tags["nova.trial_id"] for r in _children(store, parent))
    assert trial_ids == sorted(r.trial_id for r in records)


def test_import_of_a_sweep_never_logged(tracker: Tracker, store: tuple[str, str], tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(_record("n1", "backend=native", 0))
    with pytest.raises(TrackingError, match="has no parent run"):
        tracker.import_ledger(ledger.path)
    assert tracker.import_ledger(ledger.path, sweep=_sweep("n1")) == 1
    assert tracker.import_ledger(ledger.path) == 0
    parent = _client(store).get_run(tracker.start_sweep(_sweep("n1")))
    assert parent.data.params["engine.max_num_seqs"] == "64"


def test_load_sweep_reads_records_back(store: tuple[str, str]) -> None:
    tracker = Tracker(store[0], "nova-load", artifact_location=f"{store[1]}-load")
    old = [_record("old", "backend=native", 0)]
    new = [
        _record("new", arm, r, tok_s=100.0 + r) for r in range(2) for arm in ("backend=native", "backend=x")
    ]
    for sweep_id, records in (("old", old), ("new", new)):
        tracker.start_sweep(_sweep(sweep_id, name=f"name-{sweep_id}"))
        for record in records:
            tracker.log_trial(record)

    sweep_id, baseline, loaded = Tracker(store[0], "nova-load").load_sweep()
    assert (sweep_id, baseline) == ("new", "backend=native")
    assert loaded == sorted(new, key=lambda r: r.order)
    assert tracker.load_sweep("old")[2] == old
    assert tracker.load_sweep("name-old")[2] == old
    with pytest.raises(TrackingError, match="no sweep 'nope'"):
        tracker.load_sweep("nope")


def test_summary_replaces_plot_note_and_metrics(tracker: Tracker, store: tuple[str, str], tmp_path: Path) -> None:
    parent = tracker.start_sweep(_sweep("g1"))
    first, second = tmp_path / "compare.png", tmp_path / "later.png"
    first.write_bytes(b"\x89PNG first")
    second.write_bytes(b"\x89PNG second")
    tracker.log_summary("g1", {"speedup x": 1.5, "p_value": 0.2}, "# first", first)
    tracker.log_summary("g1", {"speedup x": 2.0}, "# second\n\n| arm | x |", second)

    client = _client(store)
    assert sorted(a.path for a in client.list_artifacts(parent)) == ["comparison.png", "experiment.toml"]
    assert Path(client.download_artifacts(parent, "comparison.png", str(tmp_path))).read_bytes() == b"\x89PNG second"
    run = client.get_run(parent)
    assert run.data.tags["mlflow.note.content"] == "# second\n\n| arm | x |"
    assert run.data.metrics == {"speedup x": 2.0, "p_value": 0.2}
    tracker.log_summary("g1", {}, "no plot")  # no PNG: the earlier plot stays
    assert [a.path for a in client.list_artifacts(parent)].count("comparison.png") == 1


def test_finish_sweep_statuses(tracker: Tracker, store: tuple[str, str]) -> None:
    client = _client(store)
    for status in ("KILLED", "FAILED", "FINISHED"):
        parent = tracker.start_sweep(_sweep(f"e-{status}"))
        tracker.finish_sweep(f"e-{status}", status)
        assert client.get_run(parent).info.status == status
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.finish_sweep("e-FINISHED", "DONE")


def test_children_are_named_by_short_arm_names(store: tuple[str, str], tmp_path: Path) -> None:
    names = {"backend=native": "native", "backend=x": "x · bt=64"}
    tracker = Tracker(store[0], "nova-test")
    parent = tracker.start_sweep(_sweep("c1", arm_names=names))
    tracker.log_trial(_record("c1", "backend=native", 0))
    tracker.log_trial(_record("c1", "backend=x", 1))
    # `nova-ab import` names them from the sweep.json it passes, in a Tracker that never started the sweep.
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append(_record("c1", "backend=x", 2))
    Tracker(store[0], "nova-test").import_ledger(ledger.path, _sweep("c1", arm_names=names))
    # Short names that are not unique in the sweep give way to the labels.
    clash = Tracker(store[0], "nova-test")
    other = clash.start_sweep(_sweep("c2", arm_names={"backend=native": "same", "backend=x": "same"}))
    clash.log_trial(_record("c2", "backend=x", 0))

    named = sorted(r.info.run_name for r in _children(store, parent))
    assert named == ["native · #0", "x · bt=64 · #1", "x · bt=64 · #2"]
    assert [r.info.run_name for r in _children(store, other)] == ["backend=x #0"]


def test_compare_names_each_arm_as_its_child_runs_are_named_whatever_the_axes_order(
    store: tuple[str, str], tmp_path: Path
) -> None:
    """The axes in file order (backend, then async_scheduling: not alphabetical), the sweep's names from the
    experiment file as the sweep gives them; read back from MLflow (params sorted there), compare names each arm
    as MLflow's runs table shows its children."""
    from novainfer.ab.sweep.experiment import load_experiment
    from novainfer.ab.sweep.names import arm_names, record_names

    path = tmp_path / "order.toml"
    path.write_text(
        '[workload]\nnum_seqs = 2\ninput_len = [8, 16]\noutput_len = [4, 8]\n'
        '[engine]\nmodel = "random:qwen2-tiny"\ndevice = "cpu"\nmax_model_len = 64\nkv_cache_capacity = 256\n'
        '[sweep.axes]\nbackend = ["native", "reference"]\nasync_scheduling = [true, false]\n'
    )
    arms = load_experiment(path).arms
    names = arm_names(arms)
    assert names["backend=native,async_scheduling=true"] == "native · async_scheduling=true"
    tracker = Tracker(store[0], "nova-test")
    parent = tracker.start_sweep(_sweep("order", arm_names=names))
    for repeat, arm in enumerate(arms):
        tracker.log_trial(
            dataclasses.replace(_record("order", "backend=native", repeat), trial_id=f"{arm.label}#0", arm=arm.label,
                                arm_params=arm.params, repeat=0, order=repeat)
        )
    _, _, loaded = Tracker(store[0], "nova-test", create=False).load_sweep("order")
    assert [list(r.arm_params) for r in loaded] == [["async_scheduling", "backend"]] * 4  # sorted in the store
    shown = {r.data.tags["nova.arm_name"] for r in _children(store, parent)}
    assert set(record_names(loaded).values()) == shown == set(names.values())


def test_workload_is_the_input_dataset_of_parent_and_children(tracker: Tracker, store: tuple[str, str]) -> None:
    parent = tracker.start_sweep(_sweep("w1", workload=WORKLOAD))
    tracker.log_trial(_record("w1", "backend=native", 0))
    tracker.start_sweep(_sweep("w1", workload=WORKLOAD))  # a resumed sweep logs it again: still one input
    client = _client(store)
    (child,) = _children(store, parent)
    for run_id in (parent, child.info.run_id):
        (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert (dataset.name, dataset.source_type) == ("tiny", "nova-ab")
        assert json.loads(dataset.source) == WORKLOAD
        assert json.loads(dataset.profile) == {"num_seqs": 4, "output_tokens": 23}
        assert len(dataset.digest) == 8
    # Another caliber is another dataset.
    other = tracker.start_sweep(_sweep("w2", workload={**WORKLOAD, "num_seqs": 8}))
    (other_input,) = client.get_run(other).inputs.dataset_inputs
    assert other_input.dataset.digest != dataset.digest


def test_import_finishes_a_parent_its_dead_sweep_left_running(store: tuple[str, str], tmp_path: Path) -> None:
    client = _client(store)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    records = [_record("d1", "backend=native", r) for r in range(2)]
    for record in records:
        ledger.append(record)
    dead = Tracker(store[0], "nova-test")  # the sweep dies after its first trial: nobody finishes its parent
    parent = dead.start_sweep(_sweep("d1"))
    dead.log_trial(records[0])
    # A live sweep (--resume) starts its parent, then imports: its parent stays RUNNING.
    live = Tracker(store[0], "nova-test")
    live.start_sweep(_sweep("d1"))
    assert live.import_ledger(ledger.path) == 1
    assert client.get_run(parent).info.status == "RUNNING"

    assert Tracker(store[0], "nova-test").import_ledger(ledger.path) == 0  # `nova-ab import` afterwards
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.info.end_time == int(records[-1].finished_at * 1000)
    # A sweep stopped by Ctrl-C keeps its KILLED.
    live.finish_sweep("d1", "KILLED")
    Tracker(store[0], "nova-test").import_ledger(ledger.path)
    assert client.get_run(parent).info.status == "KILLED"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_read_only_tracker_creates_no_store(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "mlflow.db"
    for uri, missing in ((f"sqlite:///{db}", db), ((tmp_path / "mlruns").as_uri(), tmp_path / "mlruns")):
        with pytest.raises(TrackingError) as caught:
            Tracker(uri, "nova-test", create=False)
        assert str(caught.value) == f"no MLflow store at {missing}"
        assert _listing(tmp_path) == []


def test_read_only_tracker_creates_no_experiment_and_logs_nothing(store: tuple[str, str]) -> None:
    writer = Tracker(store[0], "nova-read", artifact_location=f"{store[1]}-read")
    writer.start_sweep(_sweep("ro", workload=WORKLOAD))
    writer.log_trial(_record("ro", "backend=native", 0))
    db = Path(store[0].removeprefix("sqlite:///"))
    root = db.parent
    before = (_listing(root), hashlib.sha256(db.read_bytes()).hexdigest())

    with pytest.raises(TrackingError) as caught:
        Tracker(store[0], "nope", create=False)
    assert str(caught.value) == f"no experiment 'nope' in {store[0]}"
    reader = Tracker(store[0], "nova-read", create=False)
    assert [r.trial_id for r in reader.load_sweep("ro")[2]] == ["backend=native#0"]

    assert _client(store).get_experiment_by_name("nope") is None
    assert (_listing(root), hashlib.sha256(db.read_bytes()).hexdigest()) == before


def test_creating_a_store_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    Tracker(f"sqlite:///{tmp_path}/fresh.db", "nova-test")
    assert capfd.readouterr().err == ""


def test_broken_store_raises_one_error_type(tmp_path: Path) -> None:
    garbage = tmp_path / "mlflow.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TrackingError) as caught:
        Tracker(f"sqlite:///{garbage}", "nova-test")
    assert "\n" not in str(caught.value) and str(garbage) in str(caught.value)


def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as sock:  # a port nobody listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable"):
        Tracker(f"http://127.0.0.1:{port}", "nova-test")
    assert time.monotonic() - started < 10


def test_missing_parent_raises(tracker: Tracker) -> None:
    with pytest.raises(TrackingError, match="start_sweep first"):
        tracker.log_trial(_record("never-started", "backend=native", 0))
