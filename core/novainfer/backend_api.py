"""The backend contract: everything an attention backend imports from NovaInfer, and nothing else.

A backend is a pip distribution with an entry point in the `novainfer` group naming a module (or object)
that implements `register_backends`. For the run that asks for it, the engine creates the backend's object
(`BackendSpec.create(AttentionContext)`) and registers it, alone, with the engine's own plugin manager, so
exactly one backend answers the attention hooks (two would both write the KV cache):

    from novainfer.backend_api import AttentionContext, BackendSpec, Capabilities, StepBatch, hookimpl

Versions: the contract is numbered (`CONTRACT_VERSION`), and a backend says which contract it was written for
(`BackendSpec(contract_version=2)`, a literal): the registry refuses a backend of another contract, or of none,
with one line naming both. The core's version carries the same promise for pip: every novainfer 0.1.x
implements contract 2, and a new contract comes with a new minor release, so a plugin depends on
`novainfer>=0.1,<0.2` (pip refuses the wrong core at install; the registry refuses it at run time, where a
plugin was installed with --no-deps).

Per engine step the core calls, in this order:
    prepare_attention_metadata  once, from the scheduled batch (outside any CUDA graph: it may re-plan)
    write_kv, attention         once per layer each, reusing that step's metadata

Hooks are called with keyword arguments; an implementation may accept any subset of them. A hook that
returns None hands the call on: the core's own implementations answer last (KV writes by one indexed
scatter; metadata and attention by the core's plain-PyTorch attention in the cache's dtype), so a backend
may implement only what it does differently, step by step.

CUDA graphs, the protocol (when the engine runs with cuda_graphs and the backend's capabilities declare
them, and `cuda_graph_unsupported` says nothing against it): at start the core's model runner captures one
decode forward per batch size in `AttentionContext.cuda_graph_sizes`, largest first, and replays the smallest
one that holds a decode-only step. Around each capture and replay:
    - `prepare_attention_metadata` runs eagerly, before the replay, for every step: host work, planning and
      copies into fixed buffers belong there;
    - `write_kv` and `attention` run twice eagerly on a side stream with the capture's arguments (lazy
      compiles and library workspaces belong there), then once inside the capture, which runs on a stream of
      its own (a library with its own handle points it at torch.cuda.current_stream() on every call); a replay
      runs no Python, so inside the capture they launch kernels only: no host synchronisation, no reading
      device values on the host, no allocation that must outlive the step;
    - every device tensor they read or write must keep its storage from capture to replay: the batch's tensors
      do (views of the core's persistent step buffers), so does `attention`'s `output` (a view of the core's
      persistent output buffer), and the metadata a backend returns for a graph batch (`StepBatch.cuda_graph`)
      must reuse the same storage for the same batch size on every call.
A graph batch is padded: its rows past `num_actual_seqs` are dummy decodes of length 1 in the scratch
block, and its fields are graph-safe by themselves (`num_decodes` counts every row, `max_seq_len` is the
longest a sequence may be), so no backend needs the padding rule. Tests run the same padded batches eagerly,
with nothing captured (the model runner's "padded" setting): graph batches also reach a backend outside any
capture, on any device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch

hookspec = pluggy.HookspecMarker("novainfer")
hookimpl = pluggy.HookimplMarker("novainfer")

# The backend contract this core implements: raised on every change a backend must follow (a hook's arguments
# or meaning, a StepBatch or AttentionContext field's meaning or removal), and with it the core's minor version.
# An addition a backend may ignore (a new optional hook, a new field) keeps it.
CONTRACT_VERSION = 2


def cuda_graph_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The decode batch sizes the core captures, ascending: 1, 2, 4, 8, then every 16 up to max_num_seqs (and
    max_num_seqs itself). A decode-only step of n sequences replays the smallest size >= n."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs} | set(range(16, max_num_seqs + 1, 16)) | {max_num_seqs}
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class StepBatch:
    """One step's scheduled tokens, laid out for attention. B sequences, T tokens in all.

    Sequences are ordered decodes first (query length 1), then prefill chunks. Device tensors are
    views into the engine's persistent step buffers: valid for this step only, never reallocated.

    input_ids:       [T] int64, device.
    positions:       [T] int64, device; absolute position of each token in its sequence.
    slot_mapping:    [T] int64, device; flat cache slot (block * block_size + offset) of each token.
    query_start_loc: [B + 1] int32, device; sequence b's tokens are rows query_start_loc[b]:[b + 1].
    seq_lens:        [B] int32, device; tokens in the cache for each sequence once this step's are
                     written (the cached prefix plus this step's query tokens).
    block_tables:    [B, max_blocks_per_seq] int32, device; each row's unused tail is 0 (scratch block).
    query_start_loc_cpu, seq_lens_cpu, block_tables_cpu: the same values on the host (pinned), so a
                     backend can plan without a device-to-host copy.
    logits_indices:  [S] int64, device; the rows whose next-token logits are sampled (the last
                     token of each sequence whose tokens this step completes).
    num_decodes:     how many of the B sequences are decodes; they hold the first num_decodes tokens.
    num_actual_seqs: how many of the B sequences are real: B itself, except in a graph batch.
    max_query_len, max_seq_len: maxima over the batch, as host ints (a graph batch: see cuda_graph).
    block_size:      tokens per block.
    cuda_graph:      True for a decode batch padded to a CUDA-graph size; its tensors are the same storage
                     every step. Its fields hold for every step the graph replays, padding included: rows
                     past num_actual_seqs are dummy decodes (query length 1, seq_len 1) that read and write
                     the scratch block, num_decodes is B (every row a decode), max_query_len 1 and
                     max_seq_len the longest a sequence may be (the engine's max_model_len).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_tables_cpu: torch.Tensor
    logits_indices: torch.Tensor
    num_decodes: int
    num_actual_seqs: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    cuda_graph: bool = False

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


class BackendError(RuntimeError):
    """The requested backend is unknown, unavailable here, or cannot run this configuration."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run; the core refuses other settings before the backend is created.

    devices: device types ("cpu", "cuda").
    dtypes: the dtypes attention may run in, as torch names ("float32", "bfloat16", ...): `Settings.dtype`.
    block_sizes: the KV block sizes it accepts; None means any.
    cuda_graphs: whether its decode path may be captured in a CUDA graph.
    """

    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    block_sizes: tuple[int, ...] | None = None
    cuda_graphs: bool = False


@dataclass(frozen=True)
class NoOptions:
    """The options of a backend that declares none: any option given to it is an error."""


@dataclass(frozen=True)
class Settings:
    """The settings a backend is asked to run with, as plain values: the sweep judges every arm with them
    before any engine exists, and the core again when it creates the backend.

    device: "cpu" or "cuda" ("auto" resolved on the machine that asks).
    dtype: the dtype attention runs in, as a torch name: the KV cache's, which is what queries, keys and
        values reach a backend in (the model's own dtype never does).
    block_size: tokens per KV block.
    cuda_graphs: whether decode steps reach the backend as CUDA-graph batches (the engine set to capture
        them, on CUDA, and the capabilities declaring them).
    options: the backend's options, parsed: an instance of its `BackendSpec.options`.
    """

    device: str
    dtype: str
    block_size: int
    cuda_graphs: bool
    options: Any


@dataclass(frozen=True)
class AttentionContext:
    """What a backend is created with: the model's attention shape and the engine's limits.

    max_blocks_per_seq: the block tables' width (ceil(max_model_len / block_size)).
    cuda_graphs: whether this engine is set to replay decode steps in CUDA graphs (see the module's protocol;
        `cuda_graph_unsupported` may still turn it down).
    cuda_graph_sizes: the decode batch sizes it then captures, ascending (`cuda_graph_sizes(max_num_seqs)`).
    options: the backend's options. The engine passes the arm's table as given (a dict); the registry parses
        it into the backend's `BackendSpec.options` type before `create` runs, so a backend is always created
        with an instance of that type.
    """

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_blocks_per_seq: int
    dtype: torch.dtype
    device: torch.device
    cuda_graphs: bool = False
    cuda_graph_sizes: tuple[int, ...] = ()
    options: Any = field(default_factory=dict)


def _no_rule(settings: Settings) -> str | None:
    return None


def _runs_anywhere(settings: Settings | None) -> str | None:
    return None


@dataclass(frozen=True)
class BackendSpec:
    """A backend as a plugin declares it. Whether it can run with given settings is decided from this
    declaration alone, in this order, by the core (the same way for `nova-ab sweep --dry-run`, which judges
    every arm before any trial, and for an engine about to create it):

    1. options: a frozen dataclass type whose fields are the backend's options, each with a default and one
       of the types bool, int, float, str, Literal[...] or a union of them. The core parses the arm's
       `backend_options` into it: an unknown name, a wrong type or a value outside a Literal is a one-line
       error naming the option and its valid values. A rule the types cannot say goes in the dataclass's
       `__post_init__` (raise ValueError with one line). The instance reaches `create` as
       `AttentionContext.options` and `check` and `unavailable` as `Settings.options`.
    2. capabilities, then check: whether these settings suit the backend on any machine. `check` returns a
       one-line reason ("flash-attn 2 needs blocks of a multiple of 256 tokens, not 16") or None; a reason
       from either makes the arm a file error, reported before any trial.
    3. unavailable: why this machine cannot run it ("needs a CUDA GPU", "flashinfer-python is not
       installed"), or None: the arm is then skipped here, with that reason. Given the settings it judges
       them (an option may pick a library that is missing); given None it says whether anything of the
       backend can run here (what `nova-ab backends` lists).
    Neither `check` nor `unavailable` may import a kernel library to answer: installed-package metadata
    (importlib.util.find_spec, importlib.metadata) and torch's view of the device are enough.

    create: builds the object whose hookimpls answer the attention hooks for one engine.
    versions: the versions of the kernel libraries the backend runs on, read from installed-package
        metadata ({"flashinfer-python": "0.6.13"}); every trial records them.
    description: one line for `nova-ab backends`.
    contract_version: the backend contract the backend was written for, as a literal (`contract_version=2`;
        never `CONTRACT_VERSION`, which would always agree with whatever core imports it). A backend of another
        contract, or of none, is refused when it registers, with one line naming both versions.
    """

    name: str
    create: Callable[[AttentionContext], object]
    capabilities: Capabilities
    options: type = NoOptions
    check: Callable[[Settings], str | None] = _no_rule
    unavailable: Callable[[Settings | None], str | None] = _runs_anywhere
    versions: Callable[[], dict[str, str]] = dict
    description: str = ""
    contract_version: int | None = None


def core_attention_metadata(batch: StepBatch) -> Any:
    """The metadata of the core's own attention (plain PyTorch, the cache's dtype) for this step: what answers
    `prepare_attention_metadata` when a backend returns None, for a backend that wraps it."""
    from novainfer.reference import reference_metadata  # below this module: it imports the contract

    return reference_metadata(batch)


def core_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float, output: torch.Tensor
) -> None:
    """The core's own attention over `core_attention_metadata`'s metadata, written into `output`: what answers
    `attention` when a backend returns None, for a backend that wraps it (which then returns True itself)."""
    from novainfer.reference import reference_attention

    reference_attention(query, kv_cache, metadata, scale, exact=False, out=output)


@hookspec
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    """Declare this plugin's attention backends.

    Called once each time the backend registry is built (engine start, `nova-ab backends`). Must be
    cheap: import no kernel library here; do that when the backend is created.

    :param register: call it with one :class:`BackendSpec` per backend, each naming the contract it was written
        for (``contract_version``); a backend of another contract is refused there, with one line.
    """


@hookspec(firstresult=True)
def prepare_attention_metadata(batch: StepBatch) -> Any:
    """Build the backend's metadata for one engine step.

    Called once per step, before the first layer, never per layer; for a CUDA-graph step, eagerly
    before the replay (see the module's protocol). Stops at the first non-None result. Whatever it
    returns is passed unchanged as ``metadata`` to every ``write_kv`` and ``attention`` call of that
    step.

    :param batch: the scheduled batch, already on the device: positions, slot mapping, block
        tables, sequence lengths, query start offsets, and how many entries are decodes (they
        come first) and how many are prefill chunks. See :class:`StepBatch`.
    :returns: the backend's metadata object (it may be ``batch`` itself).
    """


@hookspec(firstresult=True)
def write_kv(
    layer_idx: int,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    metadata: Any,
) -> bool | None:
    """Write one layer's new keys and values into the BLOCK cache.

    Called once per layer per step, before ``attention`` of that layer; inside a CUDA-graph capture
    it may launch kernels only (see the module's protocol). Stops at the first non-None result. The
    core registers a default (one indexed scatter at the slot mapping) that runs last, so a backend
    that keeps the core's layout may leave this hook out or return None.

    :param layer_idx: the layer, from 0.
    :param key: [num_tokens, num_kv_heads, head_dim], rotary embedding applied.
    :param value: [num_tokens, num_kv_heads, head_dim].
    :param kv_cache: this layer's cache, [2, num_blocks, block_size, num_kv_heads, head_dim];
        K is ``kv_cache[0]``, V is ``kv_cache[1]``.
    :param slot_mapping: [num_tokens] int64, the flat slot (block * block_size + offset) of each
        token; padded rows point into block 0, which no sequence owns.
    :param metadata: what ``prepare_attention_metadata`` returned for this step.
    :returns: True once written; None to let the next implementation write.
    """


@hookspec(firstresult=True)
def attention(
    layer_idx: int,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: Any,
    scale: float,
    output: torch.Tensor,
) -> bool | None:
    """Attention of one layer's queries over the paged cache, written into the core's ``output``.

    Called once per layer per step, after ``write_kv``, so the cache already holds this step's
    keys and values; inside a CUDA-graph capture it may launch kernels only (see the module's
    protocol). Stops at the first non-None result. Decodes attend to their whole sequence; a
    prefill chunk attends causally: each query to the cached prefix and the chunk's tokens up to
    its own position. Decodes and prefill chunks come mixed in one batch.

    ``output`` is the core's: a view of one persistent buffer of the model runner (sized for the
    most rows a step can have), the same storage for every layer and step, and in a captured graph
    at every replay, so a step allocates nothing for it. Its rows hold stale values on entry; write
    every one. A backend may keep a reference to it (a bound kernel argument, say) but nothing it
    must read back later: the core consumes the rows before the next layer's call overwrites them.
    A library that cannot write into a given tensor gets its result copied in.

    :param layer_idx: the layer, from 0.
    :param query: [num_tokens, num_q_heads, head_dim], rotary embedding applied.
    :param kv_cache: this layer's cache, as in ``write_kv``.
    :param metadata: what ``prepare_attention_metadata`` returned for this step.
    :param scale: the softmax scale (head_dim ** -0.5).
    :param output: [num_tokens, num_q_heads, head_dim], contiguous, in the query's dtype: where the
        result goes.
    :returns: True once ``output`` holds the result; None to let the next implementation write it.
    """


@hookspec(firstresult=True)
def cuda_graph_unsupported() -> str | None:
    """Say why this backend cannot run its decode forward inside a CUDA graph, or nothing.

    Called once at engine start, when the engine is set to use CUDA graphs on a CUDA device and the
    backend's capabilities declare ``cuda_graphs``. Stops at the first non-None result. A backend
    that can be captured returns None (or leaves the hook out), and then keeps the module's CUDA-graph
    protocol.

    :returns: a one-line reason ("needs host-side shapes per step"), or None.
    """


@hookspec
def backend_counters() -> dict[str, int]:
    """Report the backend's cumulative event counts (graph builds, JIT compiles, ...).

    Called by the benchmark runner before and after the timed window; it logs the difference, which
    must be zero for builds and compiles. All results are merged.

    :returns: counter name to cumulative count since the backend was created.
    """
