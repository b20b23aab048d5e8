"""Online experiment files: [workload.arrivals], [workload.lengths] and [metrics] validated into arms (a list of
rates is an axis, peers included), each problem one `file: field: problem` line; an offline file keeps its id."""

from __future__ import annotations

from pathlib import Path

import pytest

from novainfer.ab.lengths import LengthMix
from novainfer.ab.serving import Slo
from novainfer.ab.sweep.experiment import ExperimentError, load_experiment

OFFLINE = """\
[workload]
num_seqs = 8
input_len = [16, 64]
output_len = [8, 32]

[engine]
model = "random:qwen2-tiny"
device = "cpu"
max_model_len = 128

[sweep]
repeats = 2

[sweep.axes]
max_num_batched_tokens = [64, 512]
"""
ONLINE = OFFLINE + """
[workload.arrivals]
rate = [2, 8.5]
burstiness = 0.5

[metrics.slo]
ttft_ms = 500
tpot_ms = 30
"""
MIX = """\
[workload]
num_seqs = 8

[workload.lengths]
mix = "random"
input_len = 40
output_len = 20
range_ratio = 0.5

[engine]
model = "random:qwen2-tiny"
device = "cpu"
max_model_len = 128

[sweep.axes]
backend = ["native"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_a_list_of_rates_is_an_axis_and_each_arm_gets_its_rate(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, ONLINE))
    assert [a.label for a in experiment.arms] == [
        "max_num_batched_tokens=64,rate=2", "max_num_batched_tokens=64,rate=8.5",
        "max_num_batched_tokens=512,rate=2", "max_num_batched_tokens=512,rate=8.5",
    ]
    assert experiment.baseline.label == "max_num_batched_tokens=64,rate=2"
    assert all("rate" not in a.config.to_dict() for a in experiment.arms)
    rates = [experiment.serving_for(a).arrivals.rate for a in experiment.arms]
    assert rates == [2.0, 8.5, 2.0, 8.5]
    assert experiment.serving.slo == Slo(ttft_ms=500, tpot_ms=30) and experiment.serving.arrivals.burstiness == 0.5
    assert experiment.rates == (2, 8.5)


def test_the_baseline_is_named_without_the_rate_and_peers_run_at_every_rate(tmp_path: Path) -> None:
    text = ONLINE.replace("repeats = 2", 'repeats = 2\nbaseline = { max_num_batched_tokens = 512 }\n'
                          'peers = [{ peer = "vllm" }]')
    experiment = load_experiment(write(tmp_path, text))
    assert experiment.baseline.label == "max_num_batched_tokens=512,rate=2"
    assert [a.label for a in experiment.arms if a.peer] == ["peer=vllm,rate=2", "peer=vllm,rate=8.5"]


def test_online_settings_are_part_of_the_identity_and_offline_ids_stay(tmp_path: Path) -> None:
    offline = load_experiment(write(tmp_path, OFFLINE))
    assert "serving" not in offline.to_dict() and offline.serving is None
    online = load_experiment(write(tmp_path, ONLINE))
    assert online.sweep_id != offline.sweep_id
    assert load_experiment(write(tmp_path, ONLINE.replace("tpot_ms = 30", "tpot_ms = 40"))).sweep_id != online.sweep_id
    assert online.to_dict()["serving"]["arrivals"]["rate"] == [2, 8.5]


def test_a_length_mix_sets_the_lengths_and_its_bounds(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, MIX))
    assert experiment.workload.lengths == LengthMix("random", 40, 20, 0.5)
    assert (experiment.workload.input_len, experiment.workload.output_len) == ((20, 60), (10, 30))
    assert experiment.to_dict()["workload"]["lengths"] == {
        "mix": "random", "input_len": 40, "output_len": 20, "range_ratio": 0.5
    }


@pytest.mark.parametrize(
    "base, old, new, field, problem",
    [
        (ONLINE, "rate = [2, 8.5]", "rate = 0", "workload.arrivals.rate", "> 0"),
        (ONLINE, "rate = [2, 8.5]", "rate = [2, 2]", "workload.arrivals.rate", "duplicate rate"),
        (ONLINE, "rate = [2, 8.5]", 'rate = "fast"', "workload.arrivals.rate", "expected a number or a list"),
        (ONLINE, "burstiness = 0.5", "burstiness = 0", "workload.arrivals.burstiness", "must be > 0"),
        (ONLINE, "burstiness = 0.5", "max_concurrency = 0", "workload.arrivals.max_concurrency", "must be >= 1"),
        (ONLINE, "burstiness = 0.5", "burst = 1", "workload.arrivals.burst", "unknown key"),
        (ONLINE, "ttft_ms = 500", "ttft_ms = -1", "metrics.slo.ttft_ms", "must be > 0"),
        (ONLINE, "ttft_ms = 500", "ttft_s = 1", "metrics.slo.ttft_s", "unknown key"),
        (ONLINE, "[metrics.slo]", "[metrics]\nsteady_state = [0.9, 0.1]\n[metrics.slo]", "metrics.steady_state",
         "0 <= lo < hi <= 1"),
        (OFFLINE, "[engine]", "[metrics.slo]\nttft_ms = 5\n\n[engine]", "metrics", "add [workload.arrivals]"),
        (OFFLINE, "max_num_batched_tokens = [64, 512]", "rate = [1, 2]", "sweep.axes.rate",
         "a list of rates in [workload.arrivals] makes the rate an axis"),
        (MIX, 'mix = "random"', 'mix = "lognormal"', "workload.lengths.mix", "unknown mix 'lognormal'"),
        (MIX, "range_ratio = 0.5", "range_ratio = 1.0", "workload.lengths.range_ratio", "must be < 1"),
        (MIX, "range_ratio = 0.5", "sigma = 1.0", "workload.lengths.sigma", "unknown key"),
        (MIX, "num_seqs = 8", "num_seqs = 8\ninput_len = [1, 2]", "workload.input_len", "not with [workload.lengths]"),
        (MIX, "output_len = 20", "output_len = 100", "engine.max_model_len", "below the longest request"),
        (OFFLINE, "input_len = [16, 64]\n", "", "workload.input_len", "required key is missing"),
    ],
)
def test_bad_online_files_name_the_field(
    tmp_path: Path, base: str, old: str, new: str, field: str, problem: str
) -> None:
    assert old in base
    path = write(tmp_path, base.replace(old, new))
    with pytest.raises(ExperimentError) as caught:
        load_experiment(path)
    assert caught.value.field == field, str(caught.value)
    assert problem in caught.value.problem, str(caught.value)
    assert "\n" not in str(caught.value)
