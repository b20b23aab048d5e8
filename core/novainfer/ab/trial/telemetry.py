"""The GPU's state over a trial's timed window: clocks, temperature, power and throttle reasons, read through NVML.

A throttled trial looks like a slow backend: a GPU held at its power cap or slowed for heat runs every arm's
kernels slower, and only its clocks and NVML's throttle ("clocks event") reasons tell the two apart. The trial
reads them (nvidia-ml-py, `pynvml`) at the start of the timed window, every SAMPLE_INTERVAL_S during it from a
thread, and at its end, plus NVML's power and thermal violation counters (the time the GPU spent held down,
counted by the driver, so that a throttle shorter than the sampling interval is not missed). A window that saw
thermal or power throttling (THERMAL_OR_POWER) sets TrialRecord.throttled to the reasons in words; the sweep
keeps the trial and says so in the table and in MLflow.

The record carries (see `Telemetry.apply`):
- metrics: gpu_sm_clock_mhz_start/_end/_min, gpu_mem_clock_mhz_start/_end, gpu_temperature_c_start/_end/_max,
  gpu_power_w_start/_end/_max, gpu_power_violation_ms and gpu_thermal_violation_ms (where the GPU counts them),
  gpu_telemetry_samples and gpu_throttled (1 or 0);
- tags: gpu_telemetry (how it was read, or why there is none) and gpu_throttle_reasons (every reason seen,
  idle and application clocks included, or "none");
- telemetry: the sampled series (seconds into the window, then one list per quantity), which MLflow shows as
  each metric's history (novainfer.ab.sweep.tracking).

Why not MLflow's own system-metrics logging (mlflow.system_metrics): it samples from the process that holds a
live MLflow run, and a trial's child run is created by the sweep after the trial, from the ledger (a trial on a
Ray worker may not reach the store at all); it reads no clocks and no throttle reasons; and the run page lists
"system/" metrics above the model metrics, which would push output_tok_s off the top. The series therefore are
ordinary metric histories of the child run, named like MLflow's GPU metrics (power in watts).

On the CPU, or where NVML cannot be read, there is no telemetry and the tag gpu_telemetry says why.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any, Protocol

SAMPLE_INTERVAL_S = 0.2
# The series a record keeps are thinned (every other sample dropped) past this many, so a long trial's ledger
# line stays small; the start, end, minimum and maximum are taken over every sample.
MAX_SERIES = 500
# NVML's clocks event (throttle) reasons (nvml.h, nvmlClocksEventReason*): those that mean heat or power.
THERMAL_OR_POWER = {
    0x4: "sw power cap",
    0x8: "hw slowdown",
    0x20: "sw thermal slowdown",
    0x40: "hw thermal slowdown",
    0x80: "hw power brake slowdown",
}
# The others: reasons a clock is below its maximum that say nothing of heat or power.
OTHER_REASONS = {
    0x1: "gpu idle", 0x2: "applications clocks setting", 0x10: "sync boost", 0x100: "display clock setting"
}
# nvml.h: nvmlClockType_t, nvmlTemperatureSensors_t, nvmlPerfPolicyType_t.
NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2
NVML_TEMPERATURE_GPU = 0
NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1
INSTALL = "pip install nvidia-ml-py"


@dataclass(frozen=True)
class Sample:
    """One reading: SM and memory clocks (MHz), GPU temperature (C), board power (W), NVML's reasons bitmask."""

    sm_clock_mhz: float
    mem_clock_mhz: float
    temperature_c: float
    power_w: float
    reasons: int


class Reader(Protocol):
    """What the monitor reads: one GPU's state now, and its cumulative violation counters."""

    def read(self) -> Sample: ...

    def violations_ns(self) -> dict[str, int]:
        """{"power": ns, "thermal": ns} the GPU has spent held down since the driver started; {} unsupported."""
        ...

    def close(self) -> None: ...


class NvmlReader:
    """A Reader over NVML for the GPU whose UUID the trial's engine reported (tag gpu_uuid): by UUID, because
    NVML's device indices ignore CUDA_VISIBLE_DEVICES. `nvml` is the pynvml module (a test passes a fake)."""

    def __init__(self, nvml: ModuleType | Any, gpu_uuid: str) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        try:
            # Bytes: every nvidia-ml-py version takes them (older ones fail on str).
            self.handle = nvml.nvmlDeviceGetHandleByUUID(gpu_uuid.encode())
        except Exception:
            nvml.nvmlShutdown()
            raise
        # Renamed in NVML 12.x (throttle -> clocks event); the bits are the same.
        current = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        self._reasons = current or nvml.nvmlDeviceGetCurrentClocksThrottleReasons

    def read(self) -> Sample:
        nvml, handle = self.nvml, self.handle
        return Sample(
            sm_clock_mhz=float(nvml.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_SM)),
            mem_clock_mhz=float(nvml.nvmlDeviceGetClockInfo(handle, NVML_CLOCK_MEM)),
            temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU)),
            power_w=nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # milliwatts
            reasons=int(self._reasons(handle)),
        )

    def violations_ns(self) -> dict[str, int]:
        counters = {}
        for name, policy in (("power", NVML_PERF_POLICY_POWER), ("thermal", NVML_PERF_POLICY_THERMAL)):
            # NVMLError_NotSupported on some boards: the samples still tell.
            with contextlib.suppress(Exception):
                counters[name] = int(self.nvml.nvmlDeviceGetViolationStatus(self.handle, policy).violationTime)
        return counters

    def close(self) -> None:
        self.nvml.nvmlShutdown()


def open_reader(gpu_uuid: str | None) -> Reader | str:
    """An NVML reader of the trial's GPU, or why there is none (one line)."""
    if not gpu_uuid or gpu_uuid == "none":
        return "absent: no GPU (a CPU trial)"
    try:
        import pynvml
    except ImportError:
        return f"absent: nvidia-ml-py is not installed ({INSTALL})"
    try:
        return NvmlReader(pynvml, gpu_uuid)
    except Exception as error:  # NVMLError: no driver, a MIG instance NVML will not name, ...
        return f"absent: NVML could not read {gpu_uuid}: {error}"


def reason_words(mask: int, table: dict[int, str]) -> list[str]:
    return [word for bit, word in table.items() if mask & bit]


@dataclass
class Telemetry:
    """What the monitor saw over the window (see the module's docstring for where each part goes)."""

    source: str
    metrics: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    throttled: str | None = None
    series: dict[str, list[float]] = field(default_factory=dict)

    def apply(self, record: Any) -> None:
        """Fold into a TrialRecord: its metrics, tags, throttle flag and series."""
        record.metrics.update(self.metrics)
        record.tags["gpu_telemetry"] = self.source
        if self.metrics:
            record.tags["gpu_throttle_reasons"] = ", ".join(self.reasons) or "none"
        record.throttled = self.throttled
        record.telemetry = self.series


class Monitor:
    """Reads a Reader at start(), every `interval_s` from a thread, and at stop(), which returns the Telemetry.

    `clock` gives the series' times (seconds); `sample()` is what the thread calls, public so that a test can
    drive the readings one by one (with an interval longer than the test, the thread never reads)."""

    def __init__(
        self, reader: Reader | str, interval_s: float = SAMPLE_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.reader = reader
        self.interval_s = interval_s
        self.clock = clock
        self.samples = 0
        self._first: Sample | None = None
        self._last: Sample | None = None
        self._low: dict[str, float] = {}
        self._high: dict[str, float] = {}
        self._reasons = 0
        self._series: dict[str, list[float]] = {}
        self._stride = 1
        self._t0 = 0.0
        self._violations: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if isinstance(self.reader, str):
            return
        try:
            self._violations = self.reader.violations_ns()
            self.sample()  # the series' time 0
        except Exception as error:  # telemetry that cannot be read costs the trial its telemetry, not its run
            self.reader.close()
            self.reader = f"absent: NVML could not be read: {error}"
            return
        self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        assert not isinstance(self.reader, str)
        reading = self.reader.read()
        clock = self.clock()
        with self._lock:
            if self.samples == 0:
                self._t0 = clock
            now = clock - self._t0
            self._first = self._first or reading
            self._last = reading
            self._reasons |= reading.reasons
            values = {
                "sm_clock_mhz": reading.sm_clock_mhz, "mem_clock_mhz": reading.mem_clock_mhz,
                "temperature_c": reading.temperature_c, "power_w": reading.power_w,
            }
            for name, value in values.items():
                self._low[name] = min(self._low.get(name, value), value)
                self._high[name] = max(self._high.get(name, value), value)
            if self.samples % self._stride == 0:
                for name, value in {"t_s": now, **values}.items():
                    self._series.setdefault(name, []).append(value)
                if len(self._series["t_s"]) >= MAX_SERIES:
                    self._series = {name: points[::2] for name, points in self._series.items()}
                    self._stride *= 2
            self.samples += 1

    def stop(self) -> Telemetry:
        if isinstance(self.reader, str):
            return Telemetry(source=self.reader)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sample()
            held = {name: ns - self._violations.get(name, ns) for name, ns in self.reader.violations_ns().items()}
        except Exception:  # the readings taken so far still tell
            held = {}
        self.reader.close()
        return self._telemetry(held)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a reading that fails mid-window loses that sample, never the trial
                continue

    def _telemetry(self, held_ns: dict[str, int]) -> Telemetry:
        first, last = self._first, self._last
        assert first is not None and last is not None
        metrics = {
            "gpu_sm_clock_mhz_start": first.sm_clock_mhz, "gpu_sm_clock_mhz_end": last.sm_clock_mhz,
            "gpu_sm_clock_mhz_min": self._low["sm_clock_mhz"],
            "gpu_mem_clock_mhz_start": first.mem_clock_mhz, "gpu_mem_clock_mhz_end": last.mem_clock_mhz,
            "gpu_temperature_c_start": first.temperature_c, "gpu_temperature_c_end": last.temperature_c,
            "gpu_temperature_c_max": self._high["temperature_c"],
            "gpu_power_w_start": first.power_w, "gpu_power_w_end": last.power_w,
            "gpu_power_w_max": self._high["power_w"],
            "gpu_telemetry_samples": float(self.samples),
        }
        metrics.update({f"gpu_{name}_violation_ms": ns / 1e6 for name, ns in held_ns.items()})
        heat_or_power = reason_words(self._reasons, THERMAL_OR_POWER)
        # The driver's counters catch a throttle that began and ended between two samples.
        heat_or_power += [f"{name} violation" for name, ns in held_ns.items() if ns > 0]
        metrics["gpu_throttled"] = float(bool(heat_or_power))
        reasons = reason_words(self._reasons, OTHER_REASONS) + reason_words(self._reasons, THERMAL_OR_POWER)
        return Telemetry(
            source=f"nvml (nvidia-ml-py {_nvml_version()}), every {self.interval_s:g} s over the timed window",
            metrics=metrics, reasons=reasons, throttled=", ".join(heat_or_power) or None, series=self._series,
        )


def _nvml_version() -> str:
    try:
        return version("nvidia-ml-py")
    except PackageNotFoundError:
        return "unknown"


def open_monitor(gpu_uuid: str | None) -> Monitor:
    """A monitor of the trial's GPU (tag gpu_uuid), or one that records why there is no telemetry."""
    return Monitor(open_reader(gpu_uuid))
