"""Experiment files: malformed ones fail through the real CLI with one line naming file, field and problem;
valid ones give the cartesian arms, the chosen trial order, a stable sweep id and nano-vllm's exact workload.

Each CLI run is a fresh interpreter that imports torch (about 1.5 s), so every CLI case runs once, all
concurrently, in one module-scoped fixture; the rarer error paths are checked in-process through
load_experiment, which is the same code the CLI calls.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import pytest

from novainfer import LLM, SamplingParams
from novainfer.ab.sweep.arm_checks import check_runnable
from novainfer.ab.sweep.experiment import ExperimentError, load_experiment, plan_trials
from novainfer.ab.workload import Workload, teacher_forcing_inputs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

BASE = """\
[workload]
num_seqs = 4
input_len = [16, 64]
output_len = [8, 32]

[engine]
model = "random:qwen2-tiny"
device = "cpu"
max_model_len = 128

[sweep]
repeats = 2

[sweep.axes]
backend = ["native"]
max_num_batched_tokens = [64, 512]
"""


def variant(old: str, new: str, base: str = BASE) -> str:
    """BASE with one exact edit; a typo in `old` fails loudly instead of testing the valid file."""
    assert old in base, old
    return base.replace(old, new, 1)


class BadFile(NamedTuple):
    text: str
    field: str
    problem: str  # a substring of the reported problem


MALFORMED: dict[str, BadFile] = {
    "toml_syntax": BadFile(variant("[engine]", "[engine"), "(syntax)", "line 6"),
    "unknown_key": BadFile(variant("num_seqs = 4", "num_seqs = 4\nnum_seq = 4"), "workload.num_seq", "unknown key"),
    "wrong_type": BadFile(
        variant("num_seqs = 4", 'num_seqs = "abc"'), "workload.num_seqs", "expected an integer, got 'abc'"
    ),
    "empty_axis": BadFile(variant('backend = ["native"]', "backend = []"), "sweep.axes.backend", "must not be empty"),
    "zero_length": BadFile(variant("input_len = [16, 64]", "input_len = [0, 64]"), "workload.input_len", "at least 1"),
    "negative_num_seqs": BadFile(variant("num_seqs = 4", "num_seqs = -1"), "workload.num_seqs", "must be > 0, got -1"),
    "reversed_range": BadFile(
        variant("output_len = [8, 32]", "output_len = [200, 100]"), "workload.output_len", "lo (200) > hi (100)"
    ),
    "max_model_len_short": BadFile(
        variant("max_model_len = 128", "max_model_len = 80"), "engine.max_model_len", "64 + output hi 32 = 96"
    ),
    "unknown_backend": BadFile(
        variant('backend = ["native"]', 'backend = ["native", "warp9"]'),
        "sweep.axes.backend",
        "unknown backend 'warp9'; available backends: cudnn, flashattn, flashinfer, native",
    ),
    "unknown_preset": BadFile(
        variant("random:qwen2-tiny", "random:qwen9"), "engine.model", "unknown preset 'qwen9'; presets: qwen2-tiny"
    ),
    "missing_model_dir": BadFile(
        variant("random:qwen2-tiny", "no/such/checkpoint"), "engine.model", "missing model directory"
    ),
    "baseline_not_an_arm": BadFile(
        variant("repeats = 2", 'repeats = 2\nbaseline = { max_num_batched_tokens = 128 }'),
        "sweep.baseline",
        "max_num_batched_tokens=128 matches no arm",
    ),
    "zero_repeats": BadFile(variant("repeats = 2", "repeats = 0"), "sweep.repeats", "must be >= 1, got 0"),
}

SHIPPED = ("smoke.toml", "grid.toml", "headline.toml", "serving_smoke.toml", "serving.toml", "ray_x2.toml")


class CliRun(NamedTuple):
    path: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_cli(path: Path, timeout: float = 120) -> CliRun:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "novainfer.ab.sweep.cli", "sweep", str(path), "--dry-run"],
        capture_output=True, text=True, timeout=timeout,
    )
    return CliRun(path, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliRun]:
    """Every CLI case (the malformed files and the shipped experiments), run concurrently once."""
    paths = {name: EXPERIMENTS / name for name in SHIPPED}
    for name, case in MALFORMED.items():
        paths[name] = tmp_path_factory.mktemp(name) / "experiment.toml"
        paths[name].write_text(case.text)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(paths, pool.map(run_cli, paths.values()), strict=True))


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_file_is_one_line_naming_file_field_and_problem(name: str, cli_runs: dict[str, CliRun]) -> None:
    case, run = MALFORMED[name], cli_runs[name]
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    prefix = f"nova-ab: {run.path}: {case.field}: "
    assert lines[0].startswith(prefix), lines[0]
    assert case.problem in lines[0].removeprefix(prefix), lines[0]


def test_huge_repeats_fail_through_the_cli_at_once(tmp_path: Path) -> None:
    """Once a MemoryError traceback after minutes of building a billion-trial plan; the bound is now checked on
    the file, so the CLI answers like any schema error (a fraction of a second alone). Run on its own, with a
    short timeout, so a regression fails here instead of stalling the shared CLI fixture."""
    path = write(tmp_path, variant("repeats = 2", "repeats = 1000000000"))
    run = run_cli(path, timeout=30)
    assert (run.returncode, run.stdout) == (2, ""), run
    assert run.stderr.splitlines() == [f"nova-ab: {path}: sweep.repeats: must be <= 1000, got 1000000000"], run
    assert run.seconds < 10, run


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experiments_validate_in_dry_run(name: str, cli_runs: dict[str, CliRun]) -> None:
    run = cli_runs[name]
    assert run.returncode == 0, run.stderr
    experiment = load_experiment(run.path)
    header, *lines = run.stdout.splitlines()
    assert header.startswith(f"sweep {experiment.name} #")
    assert f" · {experiment.sweep_id}: {len(experiment.arms)} arms x " in header
    arm_lines = [line for line in lines if line.startswith("  arm ")]
    assert len(arm_lines) == len(experiment.arms)
    assert all("runs here" in line or "skipped here: " in line for line in arm_lines)
    (order,) = [line for line in lines if line.startswith("  order: ")]
    seed = int(order.split("--order-seed ")[1].split()[0])  # drawn for the dry run, and said how to run it
    trial_lines = [line for line in lines if not line.startswith(("  arm ", "  order: "))]
    assert [line.split()[-1] for line in trial_lines] == [t.trial_id for t in plan_trials(experiment, seed)]


def write(tmp_path: Path, text: str, name: str = "experiment.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> ExperimentError:
    with pytest.raises(ExperimentError) as info:
        load_experiment(write(tmp_path, text))
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        (variant('device = "cpu"', 'device = "cpu"\nmax_num_seq = 8'), "engine.max_num_seq", "unknown key"),
        (variant("max_num_batched_tokens = [64, 512]", "max_num_batched_tokens = [64, 0]"),
         "sweep.axes.max_num_batched_tokens", "must be a positive integer, got 0"),
        (variant('device = "cpu"', 'dtype = "fp8"'), "engine.dtype",
         "expected 'auto', 'float32', 'bfloat16' or 'float16', got 'fp8'"),
        (variant('device = "cpu"', 'kv_cache_capacity = "lots"'), "engine.kv_cache_capacity",
         "expected an integer or 'auto', got 'lots'"),
        (variant('device = "cpu"', "kv_cache_capacity = 8"), "engine.kv_cache_capacity", "at least block_size (16)"),
        (variant("repeats = 2", 'order = "random"'), "sweep.order", "expected 'interleaved' or 'blocked'"),
        (BASE.split("[sweep]")[0], "sweep", "required key is missing"),
        (variant("[engine]", "[engine]\ncolour = 1"), "engine.colour", "unknown key; known keys: model, backend"),
        (variant('backend = ["native"]', "colour = [1]"), "sweep.axes.colour", "unknown axis"),
        (variant('backend = ["native"]', 'backend = "native"'), "sweep.axes.backend", "expected a list, got 'native'"),
        (variant('backend = ["native"]', 'block_size = [16, "32"]'), "sweep.axes.block_size",
         "expected an integer, got '32'"),
        (variant('backend = ["native"]', 'backend = ["native", "native"]'), "sweep.axes.backend",
         "duplicate value native"),
        (variant("max_num_batched_tokens = [64, 512]", "max_model_len = [96, 95]"), "sweep.axes.max_model_len",
         "95 is below the longest request"),
        (variant('device = "cpu"', "kv_cache_capacity = 16") + "block_size = [16, 32]\n", "sweep.axes",
         "arm backend=native,max_num_batched_tokens=64,block_size=32: kv_cache_capacity"),
        (variant("repeats = 2", "repeats = 2\nbaseline = { block_size = 16 }"), "sweep.baseline.block_size",
         "not an axis"),
        (variant("repeats = 2", 'repeats = 2\nbaseline = { backend = "native" }'), "sweep.baseline",
         "matches 2 arms (name more axes to pick one)"),
        (variant("repeats = 2", "repeats = 2\nwarmup_seqs = 5"), "sweep.warmup_seqs", "at most workload.num_seqs (4)"),
        (variant("repeats = 2", "repeats = 2\ntrial_timeout_s = 0"), "sweep.trial_timeout_s", "must be > 0"),
        (variant("repeats = 2", "repeats = 2\n[sweep.correctness]\nsteps_per_kind = 0"),
         "sweep.correctness.steps_per_kind", "must be >= 1, got 0"),
        # A bar cannot be loosened past bfloat16's own: 1e300 would pass anything.
        (variant("repeats = 2", "repeats = 2\n[sweep.correctness]\nmax_rel_err = 1e300"),
         "sweep.correctness.max_rel_err", "must be <= 0.01, got 1e+300"),
        (variant("repeats = 2", "repeats = 2\n[sweep.correctness]\nfloor_margin = 100"),
         "sweep.correctness.floor_margin", "must be <= 10.0, got 100"),
        (variant("repeats = 2", "repeats = 2\n[sweep.correctness]\nprompt_len = 64"),
         "sweep.correctness.prompt_len", "unknown key; known keys: enabled, max_rel_err, floor_margin, steps_per_kind"),
        (variant("num_seqs = 4", 'name = "my sweep"\nnum_seqs = 4'), "workload.name",
         "use only letters, digits, '.', '_' and '-', got 'my sweep'"),
        (variant("output_len = [8, 32]", "output_len = 32"), "workload.output_len", "expected [lo, hi]"),
        (variant("[sweep.axes]", "[sweep.axes.nested]"), "sweep.axes.nested", "expected a list"),
        # Bounds: a typo (an extra zero, TOML's inf) is a file error, not hours of work or a MemoryError.
        (variant("repeats = 2", "repeats = 1001"), "sweep.repeats", "must be <= 1000, got 1001"),
        (variant("max_num_batched_tokens = [64, 512]", f"max_num_batched_tokens = {list(range(64, 75))}")
         .replace("repeats = 2", "repeats = 1000"), "sweep.repeats", "11 arms x 1000 repeats = 11,000 trials"),
        (variant("max_num_batched_tokens = [64, 512]",
                 f"max_num_batched_tokens = {list(range(64, 165))}\nmax_num_seqs = {list(range(1, 102))}")
         .replace("repeats = 2", "repeats = 1"), "sweep.axes", "10,201 arms"),
        (variant("repeats = 2", "repeats = 2\ntrial_timeout_s = inf"), "sweep.trial_timeout_s",
         "must be a finite number, got inf"),
        (variant("repeats = 2", "repeats = 2\ntrial_timeout_s = nan"), "sweep.trial_timeout_s",
         "must be a finite number, got nan"),
        (variant("repeats = 2", "repeats = 2\ntrial_timeout_s = 604801"), "sweep.trial_timeout_s",
         "must be <= 604800"),
        (variant("num_seqs = 4", "num_seqs = 100001"), "workload.num_seqs", "must be <= 100000, got 100001"),
        (variant("input_len = [16, 64]", "input_len = [16, 1000001]"), "workload.input_len",
         "lengths must be at most 1,000,000, got [16, 1000001]"),
        (variant("output_len = [8, 32]", "output_len = [8, 10000000]"), "workload.output_len", "at most 1,000,000"),
        # A KV cache that cannot hold the longest request (64 + 32 = 96 tokens: 6 blocks of 16) on its own.
        (variant('device = "cpu"', 'device = "cpu"\nkv_cache_capacity = 80'), "engine.kv_cache_capacity",
         "80 tokens make 5 KV blocks of 16 tokens, but the longest request (input hi 64 + output hi 32 = 96 tokens) "
         "needs 6"),
        (variant('backend = ["native"]', 'backend = ["native"]\nkv_cache_capacity = [1024, 64]'),
         "sweep.axes.kv_cache_capacity", "arm backend=native,kv_cache_capacity=64,max_num_batched_tokens=64: 64 "),
        # Blocks of 64 round 65 tokens up to 2 blocks, enough for 96; blocks of 16 give 5, one short.
        (variant('device = "cpu"', 'device = "cpu"\nkv_cache_capacity = 65') + "block_size = [64, 16]\n",
         "engine.kv_cache_capacity", "block_size=16: 65 tokens make 5 KV blocks of 16 tokens"),
        (BASE + '[[sweep.peers]]\npeer = "transformers"\nkv_cache_capacity = 80\n', "sweep.peers[0].kv_cache_capacity",
         "needs 6"),
        (variant("repeats = 2", "repeats = 2\nexclude = [{ colour = 1 }]"), "sweep.exclude[0].colour",
         "not an axis; axes: backend, max_num_batched_tokens"),
        (variant("repeats = 2", "repeats = 2\nexclude = [{ max_num_batched_tokens = 100 }]"),
         "sweep.exclude[0].max_num_batched_tokens", "100 is not one of the axis's values (64, 512)"),
        (variant("repeats = 2", 'repeats = 2\nexclude = [{ backend = "native" }]'), "sweep.exclude",
         "leaves out every combination of the axes"),
        (variant("repeats = 2", 'repeats = 2\nexclude = [{ max_num_batched_tokens = 64 }, '
                 '{ backend = "native", max_num_batched_tokens = 64 }]'),
         "sweep.exclude[0]", "max_num_batched_tokens=64 leaves out no arm the others keep"),
    ],
)
def test_other_errors_name_field_and_problem(tmp_path: Path, text: str, field: str, problem: str) -> None:
    error = load_error(tmp_path, text)
    assert (error.field, error.file) == (field, str(tmp_path / "experiment.toml"))
    assert problem in error.problem, str(error)
    assert str(error) == f"{error.file}: {field}: {error.problem}"


def test_kv_capacity_check_draws_the_engines_line(tmp_path: Path) -> None:
    """The file check and the engine agree at the boundary: 81 tokens make 6 blocks of 16 (rounded up, as
    num_kv_blocks does), enough for BASE's longest request of 96 tokens; 80 make 5."""
    load_experiment(write(tmp_path, variant('device = "cpu"', 'device = "cpu"\nkv_cache_capacity = 81')))
    longest = SamplingParams(max_tokens=32, ignore_eos=True)
    settings = dict(device="cpu", max_model_len=128, warm_up=False)
    (out,) = LLM("random:qwen2-tiny", kv_cache_capacity=81, **settings).generate([[1] * 64], longest)
    assert out.num_output_tokens == 32
    load_error(tmp_path, variant('device = "cpu"', 'device = "cpu"\nkv_cache_capacity = 80'))
    with pytest.raises(ValueError, match="needs 6 KV blocks but the cache has 5"):
        LLM("random:qwen2-tiny", kv_cache_capacity=80, **settings).generate([[1] * 64], longest)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match=r": \(file\): no such file$"):
        load_experiment(tmp_path / "absent.toml")


def test_checkpoint_vocabulary_must_cover_the_workload_ids(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vocab_size": 512}))
    error = load_error(tmp_path, variant("random:qwen2-tiny", "ckpt"))
    assert error.field == "engine.model"
    assert "has vocab_size 512, but the workload draws token ids up to 10000" in error.problem


def test_arms_are_the_cartesian_product_in_file_order(tmp_path: Path) -> None:
    axes = "block_size = [16, 32]\nmax_num_batched_tokens = [64, 128, 256]"
    text = variant("max_num_batched_tokens = [64, 512]", axes)
    experiment = load_experiment(write(tmp_path, text))
    expected = [(b, t) for b in (16, 32) for t in (64, 128, 256)]
    assert [(a.config.block_size, a.config.max_num_batched_tokens) for a in experiment.arms] == expected
    assert [a.params for a in experiment.arms] == [
        {"backend": "native", "block_size": b, "max_num_batched_tokens": t} for b, t in expected
    ]
    assert experiment.arms[1].label == "backend=native,block_size=16,max_num_batched_tokens=128"
    # Everything not on an axis comes from [engine] or EngineConfig's defaults.
    fixed = {(a.config.max_model_len, a.config.device, a.config.dtype) for a in experiment.arms}
    assert fixed == {(128, "cpu", "auto")}
    assert experiment.baseline == experiment.arms[0]


def test_exclude_leaves_out_the_combinations_it_names_and_only_those(tmp_path: Path) -> None:
    """The headline's shape: async off for native only, every backend with it on."""
    axes = 'backend = ["native", "cudnn"]\nasync_scheduling = [false, true]'
    text = variant('backend = ["native"]\nmax_num_batched_tokens = [64, 512]', axes)
    text = variant('device = "cpu"', 'device = "cuda"', text)
    full = load_experiment(write(tmp_path, text, "full.toml"))
    excluded = variant("repeats = 2", 'repeats = 2\nexclude = [{ backend = "cudnn", async_scheduling = false }]', text)
    experiment = load_experiment(write(tmp_path, excluded, "excluded.toml"))
    assert [a.label for a in experiment.arms] == [
        "backend=native,async_scheduling=false", "backend=native,async_scheduling=true",
        "backend=cudnn,async_scheduling=true",
    ]
    assert [a.label for a in full.arms if a.label not in {a.label for a in experiment.arms}] == [
        "backend=cudnn,async_scheduling=false"
    ]
    assert experiment.sweep_id != full.sweep_id
    assert experiment.flat_params()["sweep.exclude"] == [{"backend": "cudnn", "async_scheduling": False}]
    named = 'repeats = 2\nbaseline = { backend = "cudnn", async_scheduling = false }'
    baseline = variant("repeats = 2", named, excluded)
    assert "matches no arm" in load_error(tmp_path, baseline).problem


def test_interleaved_and_blocked_order(tmp_path: Path) -> None:
    interleaved = plan_trials(load_experiment(write(tmp_path, BASE, "a.toml")))
    blocked = plan_trials(load_experiment(write(tmp_path, variant("repeats = 2", 'repeats = 2\norder = "blocked"'))))
    a, b = "backend=native,max_num_batched_tokens=64", "backend=native,max_num_batched_tokens=512"
    assert [t.trial_id for t in interleaved] == [f"{a}#0", f"{b}#0", f"{a}#1", f"{b}#1"]
    assert [t.trial_id for t in blocked] == [f"{a}#0", f"{a}#1", f"{b}#0", f"{b}#1"]
    assert [t.order for t in blocked] == [0, 1, 2, 3]
    assert [(t.arm.label, t.repeat) for t in blocked] == [(a, 0), (a, 1), (b, 0), (b, 1)]


def test_the_order_within_each_repeat_block_follows_the_recorded_seed(tmp_path: Path) -> None:
    from novainfer.ab.sweep.runner import SWEEP_INFO_NAME, order_seed_for, sweep_dir, sweep_info

    axes = "max_num_batched_tokens = [64, 128, 256, 512]"
    text = variant("max_num_batched_tokens = [64, 512]", axes, variant("repeats = 2", "repeats = 6"))
    experiment = load_experiment(write(tmp_path, text))

    def blocks(seed: int | None) -> list[list[str]]:
        plan = plan_trials(experiment, seed)
        assert [t.order for t in plan] == list(range(len(plan)))
        return [[t.arm.label for t in plan if t.repeat == r] for r in range(6)]

    labels = [arm.label for arm in experiment.arms]
    assert blocks(None) == [labels] * 6  # no seed: the file's order, as before seeds
    first, second = blocks(11), blocks(12)
    assert first == blocks(11)  # the same seed, the same plan
    assert first != second  # another seed, another order
    for block in first + second:
        assert sorted(block) == sorted(labels)  # every arm once per block: only the order moves
    assert len({tuple(block) for block in first}) > 1  # the order changes from block to block

    # Resuming plans the order the sweep recorded (sweep.json), whatever seed is drawn now.
    root = tmp_path / "work"
    assert order_seed_for(experiment, False, root, 11) == 11
    drawn = order_seed_for(experiment, False, root)
    assert drawn is not None and 0 <= drawn < 2**32
    directory, counter = sweep_dir(experiment, False, root)
    directory.mkdir(parents=True)
    (directory / SWEEP_INFO_NAME).write_text(json.dumps(asdict(sweep_info(experiment, directory, counter, 11))))
    assert order_seed_for(experiment, True, root) == 11 and blocks(order_seed_for(experiment, True, root)) == first
    with pytest.raises(ExperimentError, match="--order-seed: the sweep being resumed ran in the order of seed 11"):
        order_seed_for(experiment, True, root, 12)
    # A sweep recorded before seeds existed resumes in the file's order.
    (directory / SWEEP_INFO_NAME).write_text(json.dumps({"sweep_id": directory.name}))
    assert order_seed_for(experiment, True, root) is None


def test_explicit_baseline(tmp_path: Path) -> None:
    text = variant("repeats = 2", "repeats = 2\nbaseline = { max_num_batched_tokens = 512 }")
    experiment = load_experiment(write(tmp_path, text))
    assert experiment.baseline is experiment.arms[1]


def test_sweep_id_is_stable_and_tracks_content(tmp_path: Path) -> None:
    base_id = load_experiment(write(tmp_path, BASE)).sweep_id
    assert len(base_id) == 12
    assert load_experiment(write(tmp_path, BASE)).sweep_id == base_id
    # Comments, spelled-out defaults, a name and [mlflow] are not what is measured.
    same = variant("num_seqs = 4", 'name = "x"\nnum_seqs = 4\nseed = 0')
    same = variant("repeats = 2", 'repeats = 2\norder = "interleaved"\ntrial_timeout_s = 1800.0', same)
    same = f'# a comment\n{same}[mlflow]\nexperiment = "elsewhere"\n'
    assert load_experiment(write(tmp_path, same, "same.toml")).sweep_id == base_id
    for changed in (
        variant("num_seqs = 4", "num_seqs = 5"),
        variant('device = "cpu"', 'device = "cpu"\nblock_size = 32'),
        variant("repeats = 2", "repeats = 3"),
        variant("max_num_batched_tokens = [64, 512]", "max_num_batched_tokens = [512, 64]"),
    ):
        assert load_experiment(write(tmp_path, changed, "changed.toml")).sweep_id != base_id, changed


def test_check_runnable_needs_cuda_for_cuda_arms() -> None:
    """Whether this machine has CUDA is the arm check's answer (check_arms), so the rule is a function of it."""
    grid = load_experiment(EXPERIMENTS / "grid.toml")
    with pytest.raises(ExperimentError) as info:
        check_runnable(grid, cuda=False)
    assert info.value.field == "engine.device"
    assert "need a CUDA GPU" in info.value.problem and "experiments/smoke.toml" in info.value.problem
    check_runnable(load_experiment(EXPERIMENTS / "smoke.toml"), cuda=False)
    check_runnable(grid, cuda=True)


def test_kv_layout_is_the_bench_kv_layout_caliber() -> None:
    experiment = load_experiment(EXPERIMENTS / "kv_layout.toml")
    assert experiment.workload == Workload(8, (16, 128), (16, 64), 0)
    config = experiment.baseline.config
    assert experiment.baseline.params == {"backend": "native", "cuda_graphs": False}
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens) == (2048, 8, 1024)
    assert (config.block_size, config.device, config.dtype) == (16, "cuda", "bfloat16")
    assert config.model == "random:deepseek-r1-distill-qwen-1.5b"


def test_grid_is_the_compare_vllm_caliber() -> None:
    grid = load_experiment(EXPERIMENTS / "grid.toml")
    assert grid.workload == Workload(256, (100, 1024), (100, 1024), 0)
    assert [a.params["backend"] for a in grid.arms] == ["native", "cudnn", "flashattn", "flashinfer"]
    assert grid.baseline.params == {"backend": "native"}
    config = grid.baseline.config
    assert (config.max_model_len, config.max_num_seqs, config.max_num_batched_tokens) == (4096, 256, 16384)
    assert (config.device, config.dtype, config.cuda_graphs) == ("cuda", "bfloat16", True)


def test_defaults_and_flat_params(tmp_path: Path) -> None:
    experiment = load_experiment(write(tmp_path, BASE))
    sweep = experiment.sweep
    assert (sweep.order, sweep.trial_timeout_s, sweep.warmup_seqs) == ("interleaved", 1800.0, 4)  # min(4, 8)
    assert sweep.correctness.model_dump() == {
        "enabled": True, "max_rel_err": 1e-2, "floor_margin": 2.0, "steps_per_kind": 1
    }
    assert (experiment.mlflow.experiment, experiment.mlflow.tracking_uri) == ("nova-ab", None)
    params = experiment.flat_params()
    assert params["workload.num_seqs"] == 4
    assert params["sweep.axes.max_num_batched_tokens"] == [64, 512]
    assert params["sweep.baseline"] == experiment.baseline_arm == experiment.arms[0].label
    assert experiment.name == "experiment"  # the file's stem, without a [workload] name


def test_model_directory_is_resolved_beside_the_file(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vocab_size": 151936}))
    experiment = load_experiment(write(tmp_path, variant("random:qwen2-tiny", "ckpt")))
    assert {a.config.model for a in experiment.arms} == {str((tmp_path / "ckpt").resolve())}


def nano_vllm_bench_workload(seed: int, num_seqs: int, max_input_len: int, max_output_len: int) -> tuple:
    """nano-vllm bench.py's draws, with the module-level random functions (global state restored after)."""
    state = random.getstate()
    try:
        random.seed(seed)
        prompts = [
            [random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))] for _ in range(num_seqs)
        ]
        output_lens = [random.randint(100, max_output_len) for _ in range(num_seqs)]
    finally:
        random.setstate(state)
    return prompts, output_lens


def test_workload_matches_nano_vllm_bench() -> None:
    workload = Workload(num_seqs=256, input_len=(100, 1024), output_len=(100, 1024), seed=0)
    prompts, output_lens = nano_vllm_bench_workload(0, 256, 1024, 1024)
    assert workload.prompts() == prompts
    assert workload.output_lens() == output_lens
    assert workload.expected_output_tokens == sum(output_lens)
    assert workload.prompt_tokens == sum(map(len, prompts))
    assert Workload(256, (100, 1024), (100, 1024), 1).prompts() != prompts


def test_workload_survives_the_trial_json_round_trip() -> None:
    workload = Workload(8, (16, 64), (8, 32), 3)
    again = Workload(**json.loads(json.dumps(asdict(workload))))
    assert again == workload
    assert (again.prompts(), again.output_lens()) == (workload.prompts(), workload.output_lens())
    lens = workload.output_lens()
    assert workload.expected_output_tokens == sum(lens) and all(8 <= n <= 32 for n in lens)
    assert all(16 <= len(p) <= 64 and all(0 <= t <= 10000 for t in p) for p in workload.prompts())


def test_teacher_forcing_inputs_are_deterministic_and_ragged() -> None:
    args = {"seed": 1234, "num_seqs": 6, "prompt_len": 64, "decode_steps": 16, "vocab_size": 10240}
    prompts, continuations = teacher_forcing_inputs(**args)
    assert (prompts, continuations) == teacher_forcing_inputs(**args)
    assert len(prompts) == len(continuations) == 6
    assert all(32 <= len(p) <= 64 for p in prompts) and len({len(p) for p in prompts}) > 1
    assert all(len(c) == 16 for c in continuations)
    assert all(0 <= t < 10240 for seq in prompts + continuations for t in seq)
