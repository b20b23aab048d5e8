"""The hooks an attention backend implements, and the one a plugin uses to declare its backends.

A plugin is a module (or object) found through the `novainfer` entry-point group, or passed to the
engine in-process. It implements `register_backends`; the engine then creates the one backend the
run asked for and registers that object, alone, with the engine's own plugin manager, so exactly
one backend answers the attention hooks (two would both write the KV cache).

Per engine step the core calls, in this order:
    prepare_attention_metadata  once, from the scheduled batch
    write_kv, attention         once per layer each, reusing that step's metadata

Hooks are called with keyword arguments; an implementation may accept any subset of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch

    from novainfer.batch import StepBatch
    from novainfer.plugins import BackendSpec

hookspec = pluggy.HookspecMarker("novainfer")
hookimpl = pluggy.HookimplMarker("novainfer")


@hookspec
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    """Declare this plugin's attention backends.

    Called once each time the backend registry is built (engine start, `nova-ab backends`). Must be
    cheap: import no kernel library here; do that when the backend is created.

    :param register: call it with one :class:`novainfer.plugins.BackendSpec` per backend.
    """


@hookspec(firstresult=True)
def prepare_attention_metadata(batch: StepBatch) -> Any:
    """Build the backend's metadata for one engine step.

    Called once per step, before the first layer, never per layer. Stops at the first non-None
    result. Whatever it returns is passed unchanged as ``metadata`` to every ``write_kv`` and
    ``attention`` call of that step.

    :param batch: the scheduled batch, already on the device: positions, slot mapping, block
        tables, sequence lengths, query start offsets, and how many entries are decodes (they
        come first) and how many are prefill chunks. See :class:`novainfer.batch.StepBatch`.
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

    Called once per layer per step, before ``attention`` of that layer. Stops at the first
    non-None result. The core registers a default (one indexed scatter at the slot mapping) that
    runs last, so a backend that keeps the core's layout may leave this hook out or return None.

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
    layer_idx: int, query: torch.Tensor, kv_cache: torch.Tensor, metadata: Any, scale: float
) -> torch.Tensor | None:
    """Attention of one layer's queries over the paged cache.

    Called once per layer per step, after ``write_kv``, so the cache already holds this step's
    keys and values. Stops at the first non-None result. Decodes attend to their whole sequence;
    a prefill chunk attends causally: each query to the cached prefix and the chunk's tokens up to
    its own position. Decodes and prefill chunks come mixed in one batch.

    :param layer_idx: the layer, from 0.
    :param query: [num_tokens, num_q_heads, head_dim], rotary embedding applied.
    :param kv_cache: this layer's cache, as in ``write_kv``.
    :param metadata: what ``prepare_attention_metadata`` returned for this step.
    :param scale: the softmax scale (head_dim ** -0.5).
    :returns: [num_tokens, num_q_heads, head_dim] in the query's dtype.
    """


@hookspec(firstresult=True)
def cuda_graph_unsupported() -> str | None:
    """Say why this backend cannot run its decode forward inside a CUDA graph, or nothing.

    Called once at engine start, when the engine is set to use CUDA graphs and the backend's
    capabilities declare ``cuda_graphs``. Stops at the first non-None result. A backend that can
    be captured returns None (or leaves the hook out); it must then, for a batch whose
    ``cuda_graph`` flag is set, return metadata whose device tensors keep the same storage on every
    call for that batch size, since the graph replays the kernels captured against them.

    :returns: a one-line reason ("needs host-side shapes per step"), or None.
    """


@hookspec
def backend_counters() -> dict[str, int]:
    """Report the backend's cumulative event counts (graph builds, JIT compiles, ...).

    Called by the benchmark runner before and after the timed window; it logs the difference, which
    must be zero for builds and compiles. All results are merged.

    :returns: counter name to cumulative count since the backend was created.
    """
