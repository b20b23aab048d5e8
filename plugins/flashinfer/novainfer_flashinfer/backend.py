"""The flashinfer backend: decodes through BatchDecodeWithPagedKVCacheWrapper, prefill chunks through
BatchPrefillWithPagedKVCacheWrapper (causal, so a chunk also sees its sequence's cached prefix).

The core's cache [2, blocks, block_size, kv_heads, head_dim] is read as flashinfer's (K, V) pair of
NHD page tensors, ``kv_cache.unbind(0)``, with the core's block ids as page ids; nothing is copied.

Per step, ``prepare_attention_metadata`` builds the paged-KV index arrays on the host (see
metadata.py), uploads them with one copy into a persistent device buffer, and plans the wrappers
it needs; plan() reads the small indptr arrays on the host, so planning needs no device sync.
The per-layer hooks then only launch kernels.

CUDA graphs: a decode batch padded to a graph size goes through a decode wrapper of its own, one
per size of ``AttentionContext.cuda_graph_sizes``, built with ``use_cuda_graph=True`` and fixed
index buffers, so the captured kernels read the same storage on every replay; the engine plans it
(prepare_attention_metadata) outside the graph before each replay. flashinfer's split-KV choice for
such a wrapper depends only on the batch size, so a plan for any sequence lengths fits the captured
launch. Each wrapper's ``run()`` writes straight into the core's output (``out=``).

Options: see ``novainfer_flashinfer.checks.Options``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

import flashinfer
import flashinfer.jit
import torch

from novainfer.backend_api import AttentionContext, BackendError, StepBatch, hookimpl
from novainfer_flashinfer.checks import Options, use_tensor_cores
from novainfer_flashinfer.metadata import build_step_indices, staging_size

# flashinfer's float workspace: split-KV partial outputs of decode and prefill. Shared by every
# wrapper: they run one after another on one stream. flashinfer raises if a plan needs more.
WORKSPACE_BYTES = 256 << 20
KV_LAYOUT = "NHD"

DecodeWrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper
PrefillWrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper


@dataclass(frozen=True)
class AppendIndices:
    """Device views for append_paged_kv_cache over every row of the step (see metadata.StepIndices)."""

    batch_indices: torch.Tensor
    positions: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor


@dataclass(frozen=True)
class FlashInferMetadata:
    """One step's planned wrappers. Query rows :num_decodes are decodes, the rest prefill chunks."""

    num_decodes: int
    decode: DecodeWrapper | None
    prefill: PrefillWrapper | None
    append: AppendIndices | None  # None with kv_write="native"


class FlashInferBackend:
    """Answers the attention hooks for one engine."""

    def __init__(self, context: AttentionContext, options: Options) -> None:
        self.context = context
        self.options = options
        self.scale = context.head_dim**-0.5
        self.tensor_cores = use_tensor_cores(options.tensor_cores, context.num_q_heads, context.num_kv_heads)
        device = context.device
        self.width = -(-context.max_model_len // context.block_size)  # blocks per sequence, as the core's tables
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)  # zeroed: flashinfer asks so
        self.decode = DecodeWrapper(self.workspace, KV_LAYOUT, use_tensor_cores=self.tensor_cores)
        self.prefill = PrefillWrapper(self.workspace, KV_LAYOUT, backend=options.prefill_backend)
        # One per graph size where graph batches will come, first planned at capture (outside the graph).
        sizes = context.cuda_graph_sizes if context.cuda_graphs else ()
        self.graph_decodes = {size: self._graph_decode(size) for size in sizes}
        # Decode wrappers whose later plans go through _fast_plan_decode (each planned once by plan()).
        self.fast_planned: set[int] = set()
        self.fast_plan = options.decode_plan == "fast" and self.tensor_cores
        # The decode planner's query offsets: one query row per sequence.
        self.rows_host = torch.arange(context.max_num_seqs + 1, dtype=torch.int32)
        self.rows_device = self.rows_host.to(device)
        self.kv_lens_host = torch.zeros(context.max_num_seqs, dtype=torch.int32)
        self.append = options.kv_write == "append"
        # A graph batch has a token per sequence of its size, which may pass the token budget.
        max_tokens = max(context.max_num_batched_tokens, context.max_num_seqs)
        size = staging_size(context.max_num_seqs, max_tokens if self.append else 0, context.max_num_seqs * self.width)
        # Pinned, so the upload and plan()'s own copies out of it are asynchronous.
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.device_indices = torch.zeros(size, dtype=torch.int32, device=device)
        self.staged = torch.cuda.Event()  # the last step's copies out of self.host are done
        dtype = str(context.dtype).removeprefix("torch.")
        self.decode_variant = ("decode", dtype, context.head_dim, "tensor_cores" if self.tensor_cores else "cuda_cores")
        self.prefill_variant = ("prefill", dtype, context.head_dim, options.prefill_backend)
        self.append_variant = ("append", dtype, context.head_dim, "")
        self.variants: set[tuple[str, str, int, str]] = set()
        # Every module flashinfer generates is registered here before it is compiled or loaded.
        self.jit_registry = getattr(flashinfer.jit, "jit_spec_registry", None)
        self._warm_up()

    def _warm_up(self) -> None:
        """Plan and run every kernel the engine will use, on one dummy token in a one-page cache.

        flashinfer builds (JIT-compiles, or loads from its cache) a module on a wrapper's first
        plan() for a new dtype/head_dim/kernel kind and the page module on the first append: doing
        it here keeps compiles out of the timed window and out of CUDA-graph capture.
        """
        ctx = self.context
        device = ctx.device
        page = torch.zeros(1, ctx.block_size, ctx.num_kv_heads, ctx.head_dim, dtype=ctx.dtype, device=device)
        kv = (page, page.clone())
        query = torch.zeros(1, ctx.num_q_heads, ctx.head_dim, dtype=ctx.dtype, device=device)
        indptr = torch.tensor([0, 1], dtype=torch.int32)
        last_page_len = torch.ones(1, dtype=torch.int32)
        indices = torch.zeros(1, dtype=torch.int32, device=device)
        try:
            self._plan_decode(self.decode, indptr, indices, last_page_len)
            if self.fast_plan:
                self._check_fast_plan(indptr, indices, last_page_len)
            self.decode.run(query, kv)
            self._plan_prefill(indptr, indptr, indices, last_page_len)
            self.prefill.run(query, kv)
            if self.append:
                rows = torch.zeros(1, dtype=torch.int32, device=device)
                key = torch.zeros(1, ctx.num_kv_heads, ctx.head_dim, dtype=ctx.dtype, device=device)
                flashinfer.append_paged_kv_cache(
                    key, key, rows, rows, kv, indices, indptr.to(device), last_page_len.to(device), KV_LAYOUT
                )
                self.variants.add(self.append_variant)
            torch.cuda.synchronize(device)
        except Exception as error:
            # Re-raised with the shape and options, which flashinfer's own message (say,
            # "Unsupported group_size: 6") leaves out.
            raise BackendError(
                f"flashinfer cannot run {ctx.num_q_heads} query / {ctx.num_kv_heads} KV heads of dim "
                f"{ctx.head_dim} in {ctx.dtype} with {self.options} (tensor cores: {self.tensor_cores}): {error}"
            ) from error

    def _plan_decode(
        self, wrapper: DecodeWrapper, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor
    ) -> None:
        ctx = self.context
        wrapper.plan(
            indptr, indices, last_page_len, ctx.num_q_heads, ctx.num_kv_heads, ctx.head_dim, ctx.block_size,
            q_data_type=ctx.dtype, kv_data_type=ctx.dtype, sm_scale=self.scale,
        )
        self.variants.add(self.decode_variant)

    def _fast_plan_decode(
        self, wrapper: DecodeWrapper, indptr_host: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
        last_page_len: torch.Tensor, seq_lens_host: torch.Tensor,
    ) -> None:
        """What a tensor-core decode wrapper's plan() does, minus its per-sequence Python work.

        plan() takes `max()` over a tensor of the batch's lengths element by element and re-derives
        lengths and offsets the step already has, about 1 ms at 256 sequences; here the wrapper's
        device arrays are pointed at (or, in a graph wrapper, copied into) the step's uploaded ones
        and its compiled planner is called once. Valid for a wrapper plan() has already planned
        with this backend's fixed settings (module, dtypes, scale); checked against plan() at start
        (_check_fast_plan). indptr_host and seq_lens_host: [B + 1] and [B] int32 on the host; the
        rest on the device.
        """
        ctx = self.context
        batch_size = len(seq_lens_host)
        if wrapper.is_cuda_graph_enabled:  # fixed storage the captured kernels read
            wrapper._paged_kv_indptr_buf.copy_(indptr, non_blocking=True)
            wrapper._paged_kv_last_page_len_buf.copy_(last_page_len, non_blocking=True)
            wrapper._paged_kv_indices_buf[: len(indices)].copy_(indices, non_blocking=True)
        else:
            wrapper._paged_kv_indptr_buf = indptr
            wrapper._paged_kv_last_page_len_buf = last_page_len
            wrapper._paged_kv_indices_buf = indices
            wrapper._qo_indptr_buf = self.rows_device[: batch_size + 1]
        kv_lens = self.kv_lens_host[:batch_size]
        kv_lens.copy_(seq_lens_host)
        wrapper._batch_size = batch_size
        wrapper._max_kv_len = int(seq_lens_host.max())
        wrapper._plan_info = wrapper._cached_module.plan(
            wrapper._float_workspace_buffer, wrapper._int_workspace_buffer, wrapper._pin_memory_int_workspace_buffer,
            self.rows_host[: batch_size + 1], indptr_host, kv_lens, batch_size, batch_size,
            ctx.num_q_heads, ctx.num_kv_heads, ctx.block_size, wrapper.is_cuda_graph_enabled, ctx.head_dim,
            ctx.head_dim,
            False, -1,  # causal, window_left
            -1, False, 0,  # fixed_split_size, disable_split_kv, num_colocated_ctas (fa2's planner)
        )

    def _check_fast_plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor) -> None:
        """The fast plan must reproduce plan()'s plan for the same batch on this flashinfer."""
        wrapper = self.decode
        try:
            expected = list(wrapper._plan_info)
            seq_lens = (indptr[1:] - indptr[:-1] - 1) * self.context.block_size + last_page_len
            self._fast_plan_decode(
                wrapper, indptr, indptr.to(self.context.device), indices, last_page_len.to(self.context.device),
                seq_lens.to(torch.int32),
            )
            got = list(wrapper._plan_info)
        except (AttributeError, TypeError, RuntimeError) as error:
            expected, got = [], [f"{type(error).__name__}: {error}"]
        if not expected or got != expected:
            raise BackendError(
                f"flashinfer {version('flashinfer-python')}: decode_plan=\"fast\" does not reproduce the decode "
                f"wrapper's plan() here (plan info {got} != {expected}); use decode_plan=\"wrapper\""
            )
        self.fast_planned.add(id(wrapper))

    def _plan_prefill(
        self, qo_indptr: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor
    ) -> None:
        ctx = self.context
        # Causal with fewer queries than keys aligns the mask bottom-right: query i of a chunk of
        # q_len sits at position kv_len - q_len + i, so it sees the cached prefix and the chunk up to itself.
        self.prefill.plan(
            qo_indptr, indptr, indices, last_page_len, ctx.num_q_heads, ctx.num_kv_heads, ctx.head_dim,
            ctx.block_size, causal=True, sm_scale=self.scale, q_data_type=ctx.dtype, kv_data_type=ctx.dtype,
        )
        self.variants.add(self.prefill_variant)

    def _graph_decode(self, size: int) -> DecodeWrapper:
        """The decode wrapper for the graph batches of one size, with fixed buffers."""
        device = self.context.device
        return DecodeWrapper(
            self.workspace, KV_LAYOUT, use_cuda_graph=True, use_tensor_cores=self.tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(size + 1, dtype=torch.int32, device=device),
            # No sequence of the batch has more than `width` blocks.
            paged_kv_indices_buffer=torch.zeros(size * self.width, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.zeros(size, dtype=torch.int32, device=device),
        )

    @hookimpl
    def cuda_graph_unsupported(self) -> str | None:
        """None: decode runs in graphs through the per-bucket wrappers, planned outside the graph."""
        return None

    @hookimpl
    def prepare_attention_metadata(self, batch: StepBatch) -> FlashInferMetadata:
        # The staging buffer is rewritten below: the last step's copies out of it must have run.
        # The engine's per-step sampling sync already ensures it, so this does not wait in practice.
        self.staged.synchronize()
        # A CUDA-graph batch's rows past the real ones are padding decodes in the scratch block (counted).
        num_decodes = batch.num_decodes
        step = build_step_indices(
            self.host_np, batch.block_tables_cpu.numpy(), batch.seq_lens_cpu.numpy(),
            batch.query_start_loc_cpu.numpy(), self.context.block_size, num_decodes, self.append,
        )
        host, dev = self.host, self.device_indices
        dev[: step.upload_end].copy_(host[: step.upload_end], non_blocking=True)
        indices = dev[step.indices]
        last_page_len = host[step.last_page_len]
        decode = prefill = None
        if num_decodes:
            decode = self.graph_decodes[batch.num_seqs] if batch.cuda_graph else self.decode
            indptr_host = host[step.indptr][: num_decodes + 1]
            if id(decode) in self.fast_planned:
                self._fast_plan_decode(
                    decode, indptr_host, dev[step.indptr][: num_decodes + 1], indices[: step.num_decode_pages],
                    dev[step.last_page_len][:num_decodes], batch.seq_lens_cpu[:num_decodes],
                )
            else:
                self._plan_decode(decode, indptr_host, indices[: step.num_decode_pages], last_page_len[:num_decodes])
                if self.fast_plan:
                    self.fast_planned.add(id(decode))
        if num_decodes < batch.num_seqs:
            prefill = self.prefill
            self._plan_prefill(
                host[step.prefill_qo_indptr], host[step.prefill_kv_indptr], indices[step.num_decode_pages :],
                last_page_len[num_decodes:],
            )
        self.staged.record()
        append = None
        if self.append:
            append = AppendIndices(
                dev[step.batch_indices], dev[step.positions], dev[step.indptr], indices, dev[step.last_page_len]
            )
            self.variants.add(self.append_variant)
        return FlashInferMetadata(num_decodes, decode, prefill, append)

    @hookimpl
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, metadata: FlashInferMetadata
    ) -> bool | None:
        append = metadata.append
        if append is None:
            return None  # kv_write="native": the core's indexed scatter writes
        flashinfer.append_paged_kv_cache(
            key, value, append.batch_indices, append.positions, kv_cache.unbind(0), append.indices,
            append.indptr, append.last_page_len, KV_LAYOUT,
        )
        return True

    @hookimpl
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: FlashInferMetadata, scale: float,
        output: torch.Tensor,
    ) -> bool:
        if scale != self.scale:
            # The wrappers were planned with head_dim ** -0.5; flashinfer takes the scale at plan time.
            raise BackendError(f"flashinfer: planned with softmax scale {self.scale}, asked for {scale}")
        kv = kv_cache.unbind(0)
        num_decodes = metadata.num_decodes
        if metadata.decode is not None:
            metadata.decode.run(query[:num_decodes], kv, out=output[:num_decodes])
        if metadata.prefill is not None:
            metadata.prefill.run(query[num_decodes:], kv, out=output[num_decodes:])
        return True

    @hookimpl
    def backend_counters(self) -> dict[str, int]:
        """Cumulative counts; the runner logs their change over the timed window, which must be 0.

        flashinfer_kernel_variants: distinct (kind, dtype, head_dim, kernel choice) this backend has
            planned; flashinfer builds or loads one module per variant on its first plan. Warm-up
            plans all of them, so it only changes later if warm-up missed one.
        flashinfer_jit_modules: modules flashinfer has generated in this process, by anyone: each
            was JIT-compiled (or loaded from its cache) right after. Observed from flashinfer's
            JIT registry; absent on a flashinfer without one.
        flashinfer_graph_wrappers: decode wrappers built for CUDA-graph batches (one per graph size, at
            creation, when the engine runs in CUDA graphs).
        """
        counters = {
            "flashinfer_kernel_variants": len(self.variants),
            "flashinfer_graph_wrappers": len(self.graph_decodes),
        }
        if self.jit_registry is not None:
            counters["flashinfer_jit_modules"] = len(self.jit_registry.get_all_specs())
        return counters
