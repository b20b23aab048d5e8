"""GPU telemetry per trial: NVML readings over the timed window, and a throttled trial flagged everywhere.

NVML is not what we sell, so a fake `pynvml` module (the calls NvmlReader makes, with pynvml's units: clocks
in MHz, temperature in C, power in mW) is fed fixed readings: an H100 SXM-like board that holds its clocks at
1980 MHz, then is capped by power (NVML's "sw power cap", bit 0x4) and drops to 1755 MHz. The real NvmlReader,
Monitor, record, ledger, statistics, table and a real MLflow store in a temp dir take it from there.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from novainfer.ab.sweep.ledger import Ledger
from novainfer.ab.sweep.report import render_table, summary_metrics, summary_row, verdict
from novainfer.ab.sweep.runner import _one_line
from novainfer.ab.sweep.statistics import summarize
from novainfer.ab.sweep.tracking import SweepInfo, Tracker
from novainfer.ab.trial import telemetry
from novainfer.ab.trial.telemetry import MAX_SERIES, Monitor, NvmlReader, open_monitor, open_reader
from novainfer.ab.wire import TrialRecord

UUID = "GPU-5a3c1f0e-8d2b-4b7a-9f10-0c1d2e3f4a5b"
IDLE, POWER_CAP, HW_THERMAL = 0x1, 0x4, 0x40
# (SM MHz, memory MHz, C, mW, reasons): start, two readings in the window, end.
STEADY = [(1980, 2619, 41, 512_000, 0), (1980, 2619, 47, 655_000, 0), (1980, 2619, 52, 690_000, 0),
          (1980, 2619, 53, 688_000, IDLE)]
CAPPED = [(1980, 2619, 44, 530_000, 0), (1980, 2619, 55, 699_000, 0), (1755, 2619, 61, 700_000, POWER_CAP),
          (1830, 2619, 62, 700_000, 0)]


class FakeNvml:
    """The pynvml calls NvmlReader makes, answering `readings` in turn and violation counters in ns."""

    def __init__(self, readings: list[tuple[int, int, int, int, int]], violations: list[int] | None = None) -> None:
        self.readings = list(readings)
        self.violations = list(violations or [])
        self.reads = 0
        self.shut = False
        self.handle_uuid: bytes | None = None

    def nvmlInit(self) -> None:
        self.shut = False

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes) -> str:
        self.handle_uuid = uuid
        return "handle"

    def _now(self) -> tuple[int, int, int, int, int]:
        return self.readings[min(self.reads // 5, len(self.readings) - 1)]

    def _read(self, index: int) -> int:
        value = self._now()[index]
        self.reads += 1
        return value

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        return self._read({telemetry.NVML_CLOCK_SM: 0, telemetry.NVML_CLOCK_MEM: 1}[clock])

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return self._read(2)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return self._read(3)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        return self._read(4)

    def nvmlDeviceGetViolationStatus(self, handle: str, policy: int) -> Any:
        if not self.violations:
            raise RuntimeError("NVMLError_NotSupported")
        value = self.violations.pop(0) if policy == telemetry.NVML_PERF_POLICY_POWER else 0
        return SimpleNamespace(referenceTime=0, violationTime=value)


def _window(nvml: FakeNvml, readings_inside: int) -> telemetry.Telemetry:
    """The monitor over a window: a reading at start, `readings_inside` as its thread would take them (called
    here, so no timing is involved: the thread's interval is longer than any test), one at stop."""
    ticks = iter(range(100))
    monitor = Monitor(NvmlReader(nvml, UUID), interval_s=3600, clock=lambda: float(next(ticks)))
    monitor.start()
    for _ in range(readings_inside):
        monitor.sample()
    return monitor.stop()


def _record(arm: str, repeat: int, tok_s: float) -> TrialRecord:
    return TrialRecord(
        sweep_id="telemetry-1", trial_id=f"{arm}#{repeat}", arm=arm, arm_params={"backend": arm.split("=")[1]},
        repeat=repeat, order=repeat * 2 + (arm != "backend=native"), status="ok", config={"backend": "x"},
        metrics={"output_tok_s": tok_s, "run_seconds": 2.0}, tags={"gpu_uuid": UUID},
        started_at=1_700_000_000.0 + repeat, finished_at=1_700_000_002.0 + repeat,
    )


def test_a_steady_window_is_read_whole_and_not_flagged() -> None:
    nvml = FakeNvml(STEADY)
    seen = _window(nvml, 2)
    assert nvml.handle_uuid == UUID.encode() and nvml.shut  # by UUID (indices ignore CUDA_VISIBLE_DEVICES)
    m = seen.metrics
    assert (m["gpu_sm_clock_mhz_start"], m["gpu_sm_clock_mhz_end"], m["gpu_sm_clock_mhz_min"]) == (1980, 1980, 1980)
    assert (m["gpu_temperature_c_start"], m["gpu_temperature_c_end"], m["gpu_temperature_c_max"]) == (41, 53, 53)
    assert (m["gpu_power_w_start"], m["gpu_power_w_max"], m["gpu_power_w_end"]) == (512.0, 690.0, 688.0)
    assert m["gpu_telemetry_samples"] == 4 and m["gpu_throttled"] == 0
    assert seen.throttled is None and seen.reasons == ["gpu idle"]  # idle is a reason, not a throttle
    assert seen.series["t_s"] == [0.0, 1.0, 2.0, 3.0] and seen.series["sm_clock_mhz"] == [1980.0] * 4
    assert "gpu_power_violation_ms" not in m  # the board does not count them: left out, not 0


def test_a_throttle_between_two_samples_is_caught_by_the_drivers_counter() -> None:
    nvml = FakeNvml(STEADY, violations=[5_000_000, 5_000_000 + 12_500_000])  # 12.5 ms at the power cap
    seen = _window(nvml, 2)
    assert seen.metrics["gpu_power_violation_ms"] == pytest.approx(12.5) and seen.metrics["gpu_throttled"] == 1
    assert seen.throttled == "power violation"


def test_the_series_are_thinned_but_the_extremes_are_of_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "MAX_SERIES", 10)
    readings = [(1980 - i, 2619, 40 + i, 600_000, 0) for i in range(40)]
    ticks = iter(range(1000))
    monitor = Monitor(NvmlReader(FakeNvml(readings), UUID), interval_s=3600, clock=lambda: float(next(ticks)))
    monitor.start()
    for _ in range(38):
        monitor.sample()
    seen = monitor.stop()
    assert len(seen.series["t_s"]) < 10 and seen.series["t_s"][0] == 0.0
    assert seen.metrics["gpu_sm_clock_mhz_min"] == 1980 - 39 and seen.metrics["gpu_temperature_c_max"] == 40 + 39
    assert MAX_SERIES >= 100  # the real bound keeps a few minutes at the sampling interval


def test_without_a_gpu_or_nvml_the_record_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    record = _record("backend=native", 0, 100.0)
    open_monitor("none").stop().apply(record)  # device_tags' gpu_uuid on the CPU
    assert record.tags["gpu_telemetry"] == "absent: no GPU (a CPU trial)"
    assert record.throttled is None and not any(k.startswith("gpu_") for k in record.metrics)
    broken = FakeNvml(STEADY)
    broken.readings = []  # NVML answers nothing: the trial keeps running, without telemetry
    monitor = Monitor(NvmlReader(broken, UUID), interval_s=3600)
    monitor.start()
    assert monitor.stop().source.startswith("absent: NVML could not be read") and broken.shut
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    reason = open_reader(UUID)
    assert isinstance(reason, str) and "nvidia-ml-py is not installed" in reason


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    yield f"sqlite:///{tmp_path}/mlflow.db"


def test_a_throttled_trial_is_flagged_in_the_record_the_table_and_mlflow(store: str, tmp_path: Path) -> None:
    records = []
    for repeat in range(3):
        base, arm = _record("backend=native", repeat, 100.0 + repeat), _record("backend=x", repeat, 90.0 + repeat)
        _window(FakeNvml(STEADY), 2).apply(base)
        _window(FakeNvml(CAPPED if repeat == 1 else STEADY), 2).apply(arm)
        records += [base, arm]
    capped = records[3]
    # The record: flagged, with what held it down and the clocks that show it.
    assert capped.throttled == "sw power cap" and capped.metrics["gpu_throttled"] == 1
    assert capped.metrics["gpu_sm_clock_mhz_min"] == 1755 and capped.tags["gpu_throttle_reasons"] == "sw power cap"
    assert capped.tags["gpu_telemetry"].startswith("nvml")
    assert [r.throttled for r in records].count(None) == 5
    # The ledger keeps it.
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for record in records:
        ledger.append(record)
    assert ledger.records()[3].throttled == "sw power cap" and ledger.records()[3].telemetry == capped.telemetry

    def table_says(loaded: list[TrialRecord]) -> None:
        summaries = {s.arm: s for s in summarize(loaded, "backend=native")}
        assert summaries["backend=x"].throttled == 1 and summaries["backend=x"].throttle_reasons == ["sw power cap"]
        assert summaries["backend=native"].throttled == 0
        table = render_table(list(summaries.values()), {"backend=native": "native", "backend=x": "x"})
        (arm_column,) = (c for c in table.columns if c.header == "arm")
        cells = {cell.splitlines()[0]: " ".join(cell.split()) for cell in arm_column.cells}
        assert "1 THROTTLED (sw power cap)" in cells["x"] and "THROTTLED" not in cells["native"]
        assert summary_metrics(list(summaries.values()), {"backend=x": "x"})["x: throttled_trials"] == 1
        assert verdict(list(summaries.values())).endswith(
            " 1 trial ran on a GPU throttled for heat or power (THROTTLED in the table)."
        )
        assert summary_row(summaries["backend=x"])["throttled_trials"] == 1

    table_says(ledger.records())
    # The trial's line as the sweep prints it, named as its child run.
    line = _one_line(capped, {"backend=x": "x"})
    assert "x · #1" in line and "THROTTLED: sw power cap" in line

    # MLflow: the child run carries the flag (tag and metric) and the window's series as metric history.
    tracker = Tracker(store, "nova-test")
    info = SweepInfo("telemetry-1", "telemetry #1", "backend=native", {}, "", arm_names={"backend=x": "x"})
    tracker.start_sweep(info)
    tracker.import_ledger(ledger.path, info)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("nova-test")
    (child,) = client.search_runs([experiment.experiment_id], "tags.`nova.trial_id` = 'backend=x#1'")
    assert child.data.tags["nova.throttled"] == "sw power cap" and child.data.metrics["gpu_throttled"] == 1
    assert next(iter(child.data.metrics)) == "output_tok_s"  # the headline first on the run's page
    history = client.get_metric_history(child.info.run_id, "gpu_sm_clock_mhz")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [1980, 1980, 1755, 1830]
    steady = client.search_runs([experiment.experiment_id], "tags.`nova.trial_id` = 'backend=x#0'")[0]
    assert "nova.throttled" not in steady.data.tags and steady.data.metrics["gpu_throttled"] == 0
    # `nova-ab compare` reads the flag back from the store.
    _, _, loaded = Tracker(store, "nova-test", create=False).load_sweep("telemetry-1")
    assert [r.throttled for r in loaded if r.trial_id == "backend=x#1"] == ["sw power cap"]
    table_says(loaded)
