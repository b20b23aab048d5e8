"""What the bench/check_*_gpu.py scripts share: result rows, the guarded runner and its table, the attention
cases (their engines, steps and comparison), the CUDA-graph replay case, the logits part and the teacher-forced
logits references every backend's whole-model check is measured against.

An attention case runs one layer of a chosen step through each compared engine's own hooks, on its own cache and
step buffers (novainfer.testing: the engine lays the step out as it would serve it, padded to its CUDA-graph
size where the case says so): the backend under test and native's PyTorch path in the case's dtype, and that
path in float32 on the same inputs upcast, the reference. Every engine holds the same blocks, handed out in
shuffled order, and the same random cache contents; the engines share one float32 model of the checked
attention shape (the 1.5B preset's 12 query / 2 KV heads of dim 128) and run attention in their cache's dtype.

`--cpu` runs the attention part as a dry run where no GPU and no kernel library is: a tiny model, native's
PyTorch path in place of every backend (so every row passes), and the graph replay case re-run eagerly where it
would replay. It checks the cases, their engines and their comparison, not a backend.

The logits references are the two comparisons bench/check_logits_gpu.py and the sweep's gate make:
    "bf16": the whole model in bfloat16 against the CPU float32 engine. bfloat16 alone is ~3e-2 off
        float32 on this random model (bench/RESULTS.md, "Correctness on the GPU"), so the bar is
        FLOOR_SLACK times native's PyTorch path in bfloat16 (the floor), at least MAX_REL_ERROR.
    "gate": float32 weights with attention over a bfloat16 cache, against native's PyTorch path in the
        same setting (so only the attention backend differs), held to MAX_REL_ERROR.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from novainfer import LLM
from novainfer.ab.workload import teacher_forcing_inputs
from novainfer.block_manager import blocks_for
from novainfer.models.qwen2 import Qwen2ForCausalLM, build_model
from novainfer.testing import (
    Step,
    StepSeq,
    attend,
    attention_output,
    batch,
    fill_cached,
    hooks,
    kv_cache,
    prepared,
)

MAX_REL_ERROR = 1e-2
FLOOR_SLACK = 1.25
LOGITS_PRESET = "deepseek-r1-distill-qwen-1.5b"
ATTENTION_PRESET = LOGITS_PRESET  # 12 query / 2 KV heads, head_dim 128
DRY_RUN_PRESET = "qwen2-tiny"
TORCH = {"kernels": "torch"}  # native's PyTorch path: the reference backend
# The attention cases' engine limits.
MAX_MODEL_LEN, MAX_SEQS, MAX_TOKENS = 4096, 64, 4096
# The graph replay case: the cached tokens of the decodes a graph of size 8 is captured on, then replayed on.
REPLAY = ((17, 300, 1, 64, 2000), (1500, 16, 31, 700, 5, 3000, 129))


@dataclass
class Row:
    part: str
    case: str
    config: str = ""
    max_abs: float = math.nan
    rel: float = math.nan
    note: str = ""
    ok: bool = False


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def measure(row: Row, got: torch.Tensor, want: torch.Tensor) -> bool:
    """Fill the row's errors of `got` against `want`; returns whether `got` is all finite."""
    row.max_abs = float((got.float() - want.float()).abs().max())
    row.rel = relative_error(got, want)
    return bool(got.isfinite().all())


def guarded(row: Row, run: Callable[[], Row]) -> Row:
    """Run one case; an exception fails that case only and is printed in full."""
    try:
        row = run()
    except Exception as error:  # one failing case must not hide the others
        traceback.print_exc()
        row.note = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    print(f"{row.part:<9} {row.case:<38} {row.config:<13} rel {row.rel:.2e} {'PASS' if row.ok else 'FAIL'}  "
          f"{row.note}", flush=True)
    return row


def print_table(rows: list[Row]) -> None:
    """The rows again, one line each, then the count: what a device call's output tail shows."""
    print(f"\n{'part':<9} {'case':<38} {'config':<13} {'max abs':>9} {'rel err':>9}  result  "
          f"(bar: rel <= {MAX_REL_ERROR})")
    for row in rows:
        print(f"{row.part:<9} {row.case:<38} {row.config:<13} {row.max_abs:>9.2e} {row.rel:>9.2e}  "
              f"{'PASS' if row.ok else 'FAIL'}  {row.note[:120]}")
    failed = sum(not row.ok for row in rows)
    print(f"{len(rows) - failed} PASS, {failed} FAIL")


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """A script's arguments with --cpu added (the dry run of the attention part, which it runs alone) and `device`
    set from it."""
    parser.add_argument("--cpu", action="store_true", help="a dry run of the attention part on the CPU: a tiny "
                        "model, native's PyTorch path for every backend")
    args = parser.parse_args()
    if args.cpu and args.parts != ["attention"]:
        parser.error("--cpu is a dry run of the attention part only: name that part alone")
    args.device = "cpu" if args.cpu else "cuda"
    return args


def announce(cpu: bool, libraries: Callable[[], str]) -> None:
    """The run's first line: the kernel libraries (`libraries()`, asked on a GPU run only), torch and the GPU."""
    if cpu:
        print(f"dry run on the CPU (torch {torch.__version__}): {DRY_RUN_PRESET}, native's PyTorch path for "
              f"every backend", flush=True)
    else:
        print(f"{libraries()}, torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------------
# The attention cases


@dataclass(frozen=True)
class Case:
    """One step: (cached tokens, new tokens) per sequence, the first num_decodes being decodes. padded: a decode
    step as its CUDA-graph replay gets it (padded to its graph size), else as scheduled."""

    name: str
    seqs: Sequence[tuple[int, int]]
    num_decodes: int
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    padded: bool = False

    @property
    def num_real_tokens(self) -> int:
        return sum(new for _, new in self.seqs)

    def cache_tokens(self) -> int:
        """What of the cache the step holds, in tokens of whole blocks."""
        return self.block_size * sum(blocks_for(cached + new, self.block_size) for cached, new in self.seqs)


def replay_cases(block_size: int) -> tuple[Case, Case]:
    """The graph replay case's two steps: the decodes captured, and those replayed."""
    first, second = ([(cached, 1) for cached in lens] for lens in REPLAY)
    return (Case("captured", first, len(first), block_size, padded=True),
            Case("replayed", second, len(second), block_size, padded=True))


class Engines:
    """The attention cases' engines, one per (backend, options, block size, dtype), made on first use and kept (a
    failure too: it is raised again for every case that needs that engine).

    They share one float32 model and run attention in their cache's dtype, the case's; decode steps are padded as
    CUDA-graph replays would be, run eagerly (the graph replay case captures its own layer); the cache holds the
    largest case, the graph replay's two steps at once included. On the CPU (the dry run) the model is a tiny
    one and every backend native's PyTorch path.
    """

    def __init__(self, cases: Sequence[Case], device: str = "cuda") -> None:
        self.device = device
        self.dry_run = device == "cpu"
        self.model_name = f"random:{DRY_RUN_PRESET if self.dry_run else ATTENTION_PRESET}"
        self.model = build_model(self.model_name, 0, torch.float32, torch.device(device), MAX_MODEL_LEN)
        replays = [sum(c.cache_tokens() for c in replay_cases(bs)) for bs in {case.block_size for case in cases}]
        self.capacity = max([case.cache_tokens() for case in cases] + replays)
        self.made: dict[tuple, tuple[LLM, float] | Exception] = {}

    def get(self, backend: str, options: dict[str, Any], block_size: int, dtype: torch.dtype) -> tuple[LLM, float]:
        """The engine and the seconds its creation took (its backend's start included), or the error it raised."""
        key = (backend, tuple(sorted(options.items())), block_size, dtype)
        if key not in self.made:
            if self.dry_run:
                backend, options = "native", TORCH
            started = time.perf_counter()
            try:
                llm = LLM(
                    self.model_name, device=self.device, dtype="float32", shared_model=self.model, backend=backend,
                    backend_options=dict(options), kv_cache_dtype=str(dtype).removeprefix("torch."),
                    block_size=block_size, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_SEQS,
                    max_num_batched_tokens=MAX_TOKENS, kv_cache_capacity=self.capacity, warm_up=False,
                    pad_decodes=True,
                )
                self.made[key] = (llm, time.perf_counter() - started)
            except Exception as error:  # recorded, and reported for every case that needs this engine
                self.made[key] = error
        made = self.made[key]
        if isinstance(made, Exception):
            raise made
        return made


def shuffled_blocks(seqs: Sequence[tuple[int, int]], block_size: int, gen: torch.Generator) -> list[tuple[int, ...]]:
    """Each sequence's blocks, drawn without repeats from a shuffled pool of the first blocks after the scratch
    block 0."""
    counts = [blocks_for(cached + new, block_size) for cached, new in seqs]
    pool = (torch.randperm(sum(counts), generator=gen) + 1).tolist()
    tables, start = [], 0
    for n in counts:
        tables.append(tuple(pool[start : start + n]))
        start += n
    return tables


def step_seqs(seqs: Sequence[tuple[int, int]], blocks: Sequence[tuple[int, ...]]) -> list[StepSeq]:
    return [StepSeq(cached, new, blocks=table) for (cached, new), table in zip(seqs, blocks)]


def draw(gen: torch.Generator, llm: LLM, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random queries [rows, query heads, head_dim] and new keys and values [rows, KV heads, head_dim] for `llm`'s
    hooks: in its cache's dtype, on its device."""
    mc = llm.model_config
    heads = (mc.num_attention_heads, mc.num_key_value_heads, mc.num_key_value_heads)
    return tuple(torch.randn(rows, h, mc.head_dim, generator=gen).to(llm.kv_dtype).to(llm.device) for h in heads)


def synchronize(llm: LLM) -> None:
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)


@contextmanager
def case_steps(engines: Sequence[LLM], case: Case, gen: torch.Generator, seed: int) -> Iterator[list[Step]]:
    """The case's step prepared on each engine on the same shuffled blocks, its cache contents one draw in the
    first engine's dtype (list the engines in the case's dtype before a float32 one, which then holds the same
    values upcast)."""
    seqs = step_seqs(case.seqs, shuffled_blocks(case.seqs, case.block_size, gen))
    with ExitStack() as stack:
        steps = [stack.enter_context(prepared(llm, seqs, case.num_decodes)) for llm in engines]
        fill_cached(list(zip(engines, steps)), seed)
        yield steps


@dataclass
class LayerRun:
    """One engine's layer of a case: the output rows of the real tokens, the step's blocks of the layer's cache
    after it ([2, blocks, block_size, KV heads, head_dim]) and the backend's metadata for the step."""

    rows: torch.Tensor
    kv: torch.Tensor
    metadata: Any


def attention_runs(engines: Sequence[LLM], case: Case, seed: int, write_kv: bool = True) -> list[LayerRun]:
    """The case through one layer of each engine's hooks (novainfer.testing.attend) on the same inputs: the case's
    steps (case_steps) and one draw of queries, and of new keys and values written first where `write_kv` (else
    the cache's draw stands for them), in the first engine's dtype, given to each engine in its own."""
    gen = torch.Generator().manual_seed(seed)
    with case_steps(engines, case, gen, seed) as steps:
        query, key, value = draw(gen, engines[0], batch(engines[0], steps[0], case.padded).num_tokens)
        runs = []
        for llm, step in zip(engines, steps):
            new = (key.to(llm.kv_dtype), value.to(llm.kv_dtype)) if write_kv else ()
            done = attend(llm, step, query.to(llm.kv_dtype), *new, as_served=case.padded)
            blocks = [b for table in step.blocks for b in table]
            runs.append(LayerRun(done.output[: case.num_real_tokens], kv_cache(llm)[:, blocks], done.metadata))
        synchronize(engines[0])
        return runs


def attention_row(row: Row, engines: Engines, case: Case, seed: int, backend: str, options: dict[str, Any],
                  write_kv: bool = True) -> tuple[LayerRun, LayerRun]:
    """The case on `backend` (with `options`) against the reference, native's PyTorch path in float32 on the same
    inputs upcast, with that path in the case's dtype beside it for scale: fills the row's errors, its note and
    its pass (the bar, all finite), and returns the backend's and native's runs for a script's own checks."""
    reference, _ = engines.get("native", TORCH, case.block_size, torch.float32)
    native, _ = engines.get("native", TORCH, case.block_size, case.dtype)
    tested, seconds = engines.get(backend, options, case.block_size, case.dtype)
    got, scale, want = attention_runs([tested, native, reference], case, seed, write_kv)
    finite = measure(row, got.rows, want.rows)
    row.ok = row.rel <= MAX_REL_ERROR and finite
    row.note = f"native {case.dtype} rel {relative_error(scale.rows, want.rows):.1e}; backend built in {seconds:.1f}s"
    return got, scale


def captured(layer: Callable[[Any], None], metadata: Any, device: torch.device) -> Callable[[Any], None]:
    """`layer(metadata)` captured in a CUDA graph as the model runner captures a decode step (run twice on a side
    stream first), and its replay, over the metadata as re-planned in place since (what the replay is given is
    not read). In the dry run the replay runs `layer` eagerly over what it is given."""
    if device.type != "cuda":
        return layer
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer(metadata)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(metadata)
    return lambda _: graph.replay()


def graph_replay_row(row: Row, engines: Engines, backend: str, options: dict[str, Any], block_size: int,
                     write_kv: bool = True, seed: int = 11) -> Row:
    """One layer of `backend`'s bfloat16 decode graph of size 8 (write_kv where asked, then attention) captured on
    the five REPLAY decodes, its metadata re-planned for the seven longer ones in the same step buffers and the
    graph replayed, as the model runner's replay does; against the reference on the same inputs."""
    tested, _ = engines.get(backend, options, block_size, torch.bfloat16)
    reference, _ = engines.get("native", TORCH, block_size, torch.float32)
    first, second = replay_cases(block_size)
    gen = torch.Generator().manual_seed(seed)
    blocks = shuffled_blocks([*first.seqs, *second.seqs], block_size, gen)
    captured_seqs, replayed_seqs = step_seqs(first.seqs, blocks[:5]), step_seqs(second.seqs, blocks[5:])
    with (prepared(tested, captured_seqs) as one, prepared(tested, replayed_seqs) as two,
          prepared(reference, replayed_seqs) as ref):
        fill_cached([(tested, one)], seed)
        fill_cached([(tested, two), (reference, ref)], seed + 1)
        hook, cache, out = hooks(tested), kv_cache(tested), attention_output(tested, 8)
        query, key, value = draw(gen, tested, 8)
        scale = tested.model_config.head_dim**-0.5
        layout = batch(tested, one)
        slots = layout.slot_mapping  # the engine's step buffer: every batch of this graph size lands here

        def layer(metadata: Any) -> None:
            if write_kv:
                hook.write_kv(layer_idx=0, key=key, value=value, kv_cache=cache, slot_mapping=slots,
                              metadata=metadata)
            hook.attention(layer_idx=0, query=query, kv_cache=cache, metadata=metadata, scale=scale, output=out)

        replay = captured(layer, hook.prepare_attention_metadata(batch=layout), tested.device)
        layout = batch(tested, two)
        if layout.slot_mapping.data_ptr() != slots.data_ptr():
            raise RuntimeError("the engine's step buffers moved between two batches of one graph size")
        for tensor, new in zip((query, key, value), draw(gen, tested, 8)):
            tensor.copy_(new)
        fresh = (key.to(reference.kv_dtype), value.to(reference.kv_dtype)) if write_kv else ()
        want = attend(reference, ref, query.to(reference.kv_dtype), *fresh).output[:7]
        replay(hook.prepare_attention_metadata(batch=layout))  # re-planned outside the graph
        synchronize(tested)
        measure(row, out[:7], want)
    row.ok = row.rel <= MAX_REL_ERROR
    row.note = "captured on 5 decodes, replayed on 7 longer ones"
    return row


# ---------------------------------------------------------------------------------------------------
# The logits part


@dataclass
class LogitsReferences:
    """The teacher-forcing inputs, the models the compared engines share, and each kind's expected logits and bar."""

    model: str
    device: str
    settings: dict[str, Any]
    prompts: list[list[int]]
    continuations: list[list[int]]
    models: dict[str, tuple[Qwen2ForCausalLM, dict[str, str]]]  # kind -> (shared weights, dtype settings)
    expected: dict[str, list[torch.Tensor]]
    bars: dict[str, float]

    def engine(self, kind: str, backend: str, options: dict[str, Any], cuda_graphs: bool) -> dict[str, Any]:
        """LLM keyword arguments for one compared engine of `kind` ("bf16" or "gate")."""
        shared, dtypes = self.models[kind]
        return dict(model=self.model, device=self.device, backend=backend, backend_options=options,
                    cuda_graphs=cuda_graphs, shared_model=shared, **dtypes, **self.settings)


def logits_references(block_size: int = 16, preset: str = LOGITS_PRESET, device: str = "cuda") -> LogitsReferences:
    """Compute both kinds' expected logits (chunked prefill, 6 sequences so decode graphs pad) and bars."""
    model = f"random:{preset}"
    settings = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, block_size=block_size,
                    kv_cache_capacity=4096)
    torch.set_num_threads(16)
    cpu32 = build_model(model, 0, torch.float32, torch.device("cpu"), settings["max_model_len"])
    prompts, conts = teacher_forcing_inputs(
        seed=7, num_seqs=6, prompt_len=96, decode_steps=24, vocab_size=cpu32.config.vocab_size
    )
    reference = LLM(model, device="cpu", dtype="float32", shared_model=cpu32, **settings)
    expected = {"bf16": reference.teacher_forced_logits(prompts, conts)}
    del reference, cpu32
    target = torch.device(device)
    models = {
        "bf16": (build_model(model, 0, torch.bfloat16, target, settings["max_model_len"]), {"dtype": "bfloat16"}),
        "gate": (build_model(model, 0, torch.float32, target, settings["max_model_len"]),
                 {"dtype": "float32", "kv_cache_dtype": "bfloat16"}),
    }
    refs = LogitsReferences(model, device, settings, prompts, conts, models, expected, {})
    native = {kind: LLM(**refs.engine(kind, "native", TORCH, False)).teacher_forced_logits(prompts, conts)
              for kind in models}
    expected["gate"] = native["gate"]
    floor = max(relative_error(g, e) for g, e in zip(native["bf16"], expected["bf16"]))
    refs.bars.update(bf16=max(MAX_REL_ERROR, FLOOR_SLACK * floor), gate=MAX_REL_ERROR)
    print(f"bfloat16 floor (native PyTorch path vs CPU float32): {floor:.2e}; bf16 bar {refs.bars['bf16']:.2e}")
    return refs


def teacher_forced(row: Row, refs: LogitsReferences, kind: str, engine: dict[str, Any]
                   ) -> tuple[LLM, dict[str, int], dict[str, int]]:
    """Run `engine` under teacher forcing and fill the row's errors and note; the caller sets `row.ok`
    from them and from what is returned: the engine and its backend counters before and after the run."""
    llm = LLM(**engine)
    before = llm.backend_counters()
    got = llm.teacher_forced_logits(refs.prompts, refs.continuations)
    after = llm.backend_counters()
    expected = refs.expected[kind]
    row.rel = max(relative_error(g, e) for g, e in zip(got, expected))
    row.max_abs = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    agree = sum(int((g.argmax(-1) == e.argmax(-1)).sum()) for g, e in zip(got, expected))
    row.note = f"{llm.graph_mode}; argmax {agree}/{sum(e.shape[0] for e in expected)}"
    return llm, before, after


def counters_moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that changed while running: compiles or graph builds after the engine was built."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


@dataclass(frozen=True)
class Arm:
    """One engine of the logits part: its rows' case (after the kind) and config columns, and what it runs."""

    case: str
    config: str
    backend: str
    options: dict[str, Any]
    graphs: bool


# A logits row's own pass rule: (row, arm, engine, backend counters before the run, after) -> passed; it may add
# to the row's note.
Judge = Callable[[Row, Arm, LLM, dict[str, int], dict[str, int]], bool]


def logits_rows(refs: LogitsReferences, arms: Sequence[Arm], judge: Judge) -> list[Row]:
    """Both comparisons of `refs` for every arm, a row a kind: it passes within its kind's bar when `judge` says
    so too."""
    rows = []
    for arm in arms:
        for kind in refs.models:
            row = Row("logits", f"{kind} {arm.case}", arm.config)
            rows.append(guarded(row, functools.partial(_logits_row, row, refs, kind, arm, judge)))
            torch.cuda.empty_cache()
    return rows


def _logits_row(row: Row, refs: LogitsReferences, kind: str, arm: Arm, judge: Judge) -> Row:
    llm, before, after = teacher_forced(row, refs, kind, refs.engine(kind, arm.backend, arm.options, arm.graphs))
    passed = judge(row, arm, llm, before, after)
    row.ok = row.rel <= refs.bars[kind] and passed
    return row


def steady(under_test: str) -> Judge:
    """No backend counter (compiles, graph builds) moves while the model runs, and `under_test` really replays
    CUDA graphs where its arm asks for them (native's PyTorch path runs eagerly, as context)."""

    def judge(row: Row, arm: Arm, llm: LLM, before: dict[str, int], after: dict[str, int]) -> bool:
        moved = counters_moved(before, after)
        row.note += f"; counters {after}; moved while running: {moved or 'none'}"
        return not moved and (not arm.graphs or arm.backend != under_test or llm.graph_mode == "cuda_graphs")

    return judge
