"""Peer arms: other engines in the same sweep, through the real CLI, trial subprocesses and MLflow store.

On this CPU machine the transformers peer runs for real (continuous batching on a tiny random checkpoint) and
the vllm peer is absent, so its arm must be skipped with the reason. The checkpoint that peers load must hold
exactly the weights of `random:<preset>`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from test_experiment import BASE, load_error, run_cli, variant, write
from test_sweep import TRIAL_TAGS, client, ledger_records, nova_ab, runs

from novainfer import LLM
from novainfer.ab.sweep.experiment import load_experiment
from novainfer.ab.sweep.outcome import EXIT_TRIALS_FAILED
from novainfer.ab.trial.checkpoints import RECIPE_FILE, materialize
from novainfer.ab.trial.peers.vllm_peer import _chosen_backend
from novainfer.ab.workload import Workload, teacher_forcing_inputs
from novainfer.models import presets

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PEER_METRICS = {"output_tok_s", "total_tok_s", "run_seconds", "expected_tokens", "actual_tokens", "prompt_tokens"}

SWEEP = """
[workload]
num_seqs = 4
input_len = [8, 24]
output_len = [4, 12]

[engine]
model = "random:qwen2-tiny"
device = "cpu"
max_model_len = 64
kv_cache_capacity = 512

[sweep]
repeats = 1
trial_timeout_s = 120
warmup_seqs = 1
axes = { backend = ["native"] }

[[sweep.peers]]
peer = "transformers"
block_size = 8

[[sweep.peers]]
peer = "vllm"

[[sweep.peers]]
peer = "transformers"
kv_cache_dtype = "bfloat16"

[[sweep.peers]]
peer = "transformers"
attn_implementation = "flash_attention_2"
"""


@pytest.fixture(scope="module")
def peer_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real sweep: our native arm, the transformers and vllm peers, and transformers arms asking for a KV
    cache dtype no peer has and for an attention whose package is absent; returns its working directory."""
    cwd = tmp_path_factory.mktemp("peer-sweep")
    result = nova_ab(cwd, "sweep", str(write(cwd, SWEEP, "peers.toml")))
    # Arms that cannot run here (vLLM absent, a KV dtype or an attention the peer lacks) are skipped: not measured.
    assert result.returncode == EXIT_TRIALS_FAILED, result.stderr[-3000:]
    assert "skipped" in result.stdout.splitlines()[-1]
    return cwd


def test_transformers_peer_is_logged_like_any_arm(peer_sweep: Path) -> None:
    parents, children = runs(peer_sweep, "nova-ab")
    assert len(parents) == 1 and len(children) == 5
    child = next(c for c in children if c.data.tags["nova.arm"] == "peer=transformers,block_size=8")
    data = child.data
    assert data.tags["nova.status"] == "ok", data.tags.get("nova.reason")
    assert set(data.metrics) >= PEER_METRICS | {"peak_memory_bytes", "max_rel_err"}
    expected = Workload(4, (8, 24), (4, 12)).expected_output_tokens
    assert data.metrics["actual_tokens"] == data.metrics["expected_tokens"] == expected
    assert data.metrics["output_tok_s"] > 0 and data.metrics["run_seconds"] > 0
    # The gate compares transformers' float32 forward with ours on the same checkpoint: only rounding differs.
    assert data.metrics["max_rel_err"] <= 1e-5
    assert set(data.tags) >= TRIAL_TAGS
    assert (data.tags["engine"], data.tags["attention_backend"]) == ("transformers", "sdpa")
    assert data.tags["peer_version"] == data.params["transformers_version"] == version("transformers")
    assert data.params["peer"] == "transformers"
    # The arm's override reached transformers as its page size; the rest came from [engine].
    assert (data.params["transformers.page_size"], data.params["transformers.num_blocks"]) == ("8", "64")
    assert data.params["transformers.allow_block_sharing"] == "False"
    assert "backend" not in data.params and "engine.backend" not in data.params
    assert "config.json" in {a.path for a in client(peer_sweep).list_artifacts(child.info.run_id)}
    # The random model was written once as a checkpoint directory beside the sweep.
    (checkpoint,) = (peer_sweep / ".nova-ab" / "checkpoints").iterdir()
    assert checkpoint.name.startswith("qwen2-tiny-seed0-") and (checkpoint / RECIPE_FILE).is_file()


def test_missing_vllm_is_skipped_with_its_reason(peer_sweep: Path) -> None:
    if find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    records = {r["arm"]: r for r in ledger_records(peer_sweep)}
    assert records["peer=vllm"]["status"] == "skipped"
    assert records["peer=vllm"]["reason"] == "vllm is not installed"
    assert records["backend=native"]["status"] == "ok"
    _, children = runs(peer_sweep, "nova-ab")
    child = next(c for c in children if c.data.tags["nova.arm"] == "peer=vllm")
    assert child.data.tags["nova.reason"] == "vllm is not installed"
    assert child.data.tags["engine"] == "vllm"


def test_a_kv_cache_dtype_the_peer_lacks_is_skipped(peer_sweep: Path) -> None:
    (record,) = [r for r in ledger_records(peer_sweep) if r["arm"] == "peer=transformers,kv_cache_dtype=bfloat16"]
    assert (record["status"], record["reason"]) == (
        "skipped", "transformers keeps its KV cache in the model's dtype (float32), not bfloat16"
    )


def test_an_attention_whose_package_is_absent_is_skipped(peer_sweep: Path) -> None:
    if find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    arm = "peer=transformers,attn_implementation=flash_attention_2"
    (record,) = [r for r in ledger_records(peer_sweep) if r["arm"] == arm]
    assert record["status"] == "skipped"
    assert record["reason"].startswith("transformers cannot run attn_implementation 'flash_attention_2' here: ")
    assert "\n" not in record["reason"]


def test_materialized_checkpoint_has_the_random_preset_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    # An untied tiny preset too, so the separate lm_head is written and read.
    untied = replace(presets.PRESETS["qwen2-tiny"], tie_word_embeddings=False)
    monkeypatch.setitem(presets.PRESETS, "tiny-untied", untied)
    prompts, continuations = teacher_forcing_inputs(
        seed=5, num_seqs=3, prompt_len=24, decode_steps=6, vocab_size=10240
    )
    for model in ("random:qwen2-tiny", "random:tiny-untied"):
        directory = materialize(model, seed=3, root=tmp_path)
        settings = {"device": "cpu", "dtype": "float32", "max_model_len": 64, "kv_cache_capacity": 256, "seed": 3}
        ours = LLM(model, **settings).teacher_forced_logits(prompts, continuations)
        loaded = LLM(str(directory), **settings).teacher_forced_logits(prompts, continuations)
        assert all(torch.equal(a, b) for a, b in zip(ours, loaded)), model
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            for prompt, continuation, want in zip(prompts, continuations, ours):
                logits = hf(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1 : -1]
                assert (logits - want).abs().max().item() <= 1e-4, model
        config = json.loads((directory / "config.json").read_text())
        assert config["tie_word_embeddings"] is (model == "random:qwen2-tiny")


def test_materialized_checkpoints_are_cached_by_recipe(tmp_path: Path) -> None:
    first = materialize("random:qwen2-tiny", seed=0, root=tmp_path)
    written = (first / "model.safetensors").stat().st_mtime_ns
    assert materialize("random:qwen2-tiny", seed=0, root=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    other = materialize("random:qwen2-tiny", seed=1, root=tmp_path)
    assert other != first and other.name.startswith("qwen2-tiny-seed1-")
    assert (other / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no scratch left
    assert materialize(str(first), seed=7, root=tmp_path) == first  # a directory is used as it is


def test_peer_arms_beside_the_axes(tmp_path: Path) -> None:
    text = BASE + '\n[[sweep.peers]]\npeer = "vllm"\ncuda_graphs = true\n\n[[sweep.peers]]\npeer = "transformers"\n'
    experiment = load_experiment(write(tmp_path, text))
    labels = [arm.label for arm in experiment.arms]
    assert labels == [
        "backend=native,max_num_batched_tokens=64", "backend=native,max_num_batched_tokens=512",
        "peer=vllm,cuda_graphs=true", "peer=transformers",
    ]
    vllm, transformers = experiment.arms[2:]
    assert (vllm.peer, vllm.params) == ({"peer": "vllm"}, {"peer": "vllm", "cuda_graphs": True})
    assert vllm.config.cuda_graphs and not experiment.engine.cuda_graphs
    assert transformers.peer == {"peer": "transformers", "attn_implementation": "sdpa"}
    # Not on any axis: the peers run the [engine] settings.
    assert transformers.config.max_num_batched_tokens == experiment.engine.max_num_batched_tokens
    assert experiment.sweep.peers == [
        {"peer": "vllm", "cuda_graphs": True}, {"peer": "transformers", "attn_implementation": "sdpa"}
    ]
    with_baseline = variant("repeats = 2", 'repeats = 2\nbaseline = { peer = "vllm" }', text)
    assert load_experiment(write(tmp_path, with_baseline)).baseline.label == "peer=vllm,cuda_graphs=true"
    # Peers change what is measured, and an empty list of them leaves a sweep's id as it was without the key.
    without = load_experiment(write(tmp_path, BASE)).sweep_id
    assert experiment.sweep_id != without
    assert load_experiment(write(tmp_path, variant("repeats = 2", "repeats = 2\npeers = []"))).sweep_id == without


@pytest.mark.parametrize(
    ("peers", "field", "problem"),
    [
        ('[[sweep.peers]]\npeer = "sglang"', "sweep.peers[0].peer",
         "unknown peer 'sglang'; peers: vllm, transformers"),
        ("[[sweep.peers]]\nblock_size = 16", "sweep.peers[0].peer", "required key is missing; peers: vllm"),
        ('[[sweep.peers]]\npeer = "vllm"\nattn_implementation = "sdpa"', "sweep.peers[0].attn_implementation",
         "unknown key; known keys: peer, model, dtype"),
        ('[[sweep.peers]]\npeer = "transformers"\nbackend = "native"', "sweep.peers[0].backend", "unknown key"),
        ('[[sweep.peers]]\npeer = "transformers"\nblock_size = "16"', "sweep.peers[0].block_size",
         "expected an integer, got '16'"),
        ('[[sweep.peers]]\npeer = "transformers"\nattn_implementation = 2', "sweep.peers[0].attn_implementation",
         "expected a string, got 2"),
        ('[[sweep.peers]]\npeer = "vllm"\nmax_model_len = 90', "sweep.peers[0].max_model_len",
         "90 is below the longest request"),
        ('[[sweep.peers]]\npeer = "vllm"\nmax_num_seqs = 0', "sweep.peers[0].max_num_seqs",
         "must be a positive integer"),
        ('[[sweep.peers]]\npeer = "vllm"\nmodel = "random:qwen9"', "sweep.peers[0].model",
         "unknown preset 'qwen9'"),
        ('[[sweep.peers]]\npeer = "vllm"\n[[sweep.peers]]\npeer = "vllm"', "sweep.peers[1]",
         "duplicate arm peer=vllm"),
        ('peers = ["vllm"]', "sweep.peers[0]", "expected a table, got 'vllm'"),
        ('[[sweep.peers]]\npeer = "vllm"\n[sweep.baseline]\npeer = "transformers"', "sweep.baseline",
         "peer=transformers matches no arm"),
        ('[[sweep.peers]]\npeer = "vllm"\n[sweep.baseline]\ncolour = 1', "sweep.baseline.colour",
         "not an axis or peer key; keys: backend, max_num_batched_tokens, peer"),
    ],
)
def test_bad_peer_entries_name_field_and_problem(tmp_path: Path, peers: str, field: str, problem: str) -> None:
    # The peers go inside [sweep] (before [sweep.axes]) so that `peers = [...]` is a key of that table.
    error = load_error(tmp_path, variant("[sweep.axes]", f"{peers}\n\n[sweep.axes]"))
    assert error.field == field, str(error)
    assert problem in error.problem, str(error)


def test_bad_peer_is_one_line_exit_2_through_the_cli(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + '\n[[sweep.peers]]\npeer = "sglang"\n')
    run = run_cli(path)
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == f"nova-ab: {path}: sweep.peers[0].peer: unknown peer 'sglang'; peers: vllm, transformers\n"


def test_a_peer_left_on_the_engine_setting_every_arm_overrides_is_refused(tmp_path: Path) -> None:
    # kv_layout's trap on the H200: an axis put our arm on CUDA graphs, the [engine] table left them off, and the
    # peer took the table's value: vLLM ran eager beside a graph-replayed arm.
    graphs = variant("backend = [\"native\"]", "backend = [\"native\"]\ncuda_graphs = [true]")
    error = load_error(tmp_path, graphs + '\n[[sweep.peers]]\npeer = "vllm"\n')
    assert error.field == "sweep.peers[0].cuda_graphs", str(error)
    assert error.problem == (
        "every arm runs cuda_graphs = true (sweep.axes) but this peer would take false from [engine]; "
        "set it in the peer's table (cuda_graphs = true to compare like with like)"
    )
    # Said in the peer's table, either way, it is the file's choice; an axis that varies it covers the peer's value.
    for peer, axis, want in (
        ("cuda_graphs = true", "[true]", True), ("cuda_graphs = false", "[true]", False), ("", "[false, true]", False)
    ):
        text = variant("backend = [\"native\"]", f"backend = [\"native\"]\ncuda_graphs = {axis}")
        experiment = load_experiment(write(tmp_path, text + f'\n[[sweep.peers]]\npeer = "vllm"\n{peer}\n'))
        assert experiment.arms[-1].config.cuda_graphs is want
    # The same for any setting a peer maps: max_num_batched_tokens narrowed to one value the engine does not have.
    narrowed = variant("max_num_batched_tokens = [64, 512]", "max_num_batched_tokens = [64]")
    error = load_error(tmp_path, narrowed + '\n[[sweep.peers]]\npeer = "transformers"\n')
    assert error.field == "sweep.peers[0].max_num_batched_tokens", str(error)


def test_peers_experiment_is_the_compare_vllm_caliber() -> None:
    peers = load_experiment(EXPERIMENTS / "peers.toml")
    grid = load_experiment(EXPERIMENTS / "grid.toml")
    assert peers.workload == grid.workload == Workload(256, (100, 1024), (100, 1024), 0)
    assert [arm.label for arm in peers.arms] == ["backend=native", "peer=vllm", "peer=transformers,cuda_graphs=false"]
    native, vllm, transformers = peers.arms
    assert peers.baseline is native and native.config == grid.baseline.config
    assert vllm.config == native.config and native.config.cuda_graphs
    assert transformers.config == replace(native.config, cuda_graphs=False)


def test_vllm_attention_backend_is_read_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    assert _chosen_backend(log) == "unknown"
    log.write_text("INFO [cuda.py:1] Using Flash Attention backend on V1 engine.\n")
    assert _chosen_backend(log) == "Flash Attention"
    log.write_text(
        "INFO [cuda.py:1] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN', 'FLEX']\n"
        "INFO [cuda.py:2] Using backend AttentionBackendEnum.FLASH_ATTN for vit attention\n"
    )
    assert _chosen_backend(log) == "FLASH_ATTN"
    log.write_text("INFO [cuda.py:3] Using AttentionBackendEnum.FLASHINFER backend.\nINFO loading weights\n")
    assert _chosen_backend(log) == "FLASHINFER"
