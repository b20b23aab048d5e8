"""What must hold before the flashinfer backend is built: its options' types, and a machine it runs on.

Pure functions of plain values, so they import neither flashinfer nor CUDA and are tested on any
machine; ``novainfer_flashinfer.__init__`` gathers the facts they judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# The oldest flashinfer-python release this plugin was checked against.
MIN_VERSION = (0, 6, 13)
# flashinfer's paged kernels need Ampere (sm80) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Options:
    """The backend's options (``backend_options`` in the engine config), each an A/B axis; the core parses
    the arm's table into this type (unknown names and values are errors naming the valid ones).

    kv_write: "native" lets the core's indexed scatter write the cache; "append" writes it with
        flashinfer.append_paged_kv_cache.
    tensor_cores: decode through flashinfer's tensor-core (prefill-style) kernel (true) or its
        CUDA-core decode kernel (false); "auto" takes tensor cores when more than 4 query heads
        share a KV head, as vLLM and SGLang do. flashinfer 0.6's CUDA-core decode has kernels for
        group sizes 1, 2, 3, 4 and 8 only, so false fails there for 12 query / 2 KV heads.
    prefill_backend: flashinfer's prefill implementation: "auto" (FA3 on sm90, else FA2), "fa2", "fa3".
    decode_plan: "fast" plans a tensor-core decode wrapper's later steps with one call into its
        compiled planner, from the step's host arrays (see FlashInferBackend._fast_plan_decode);
        "wrapper" calls the wrapper's own plan() every step, whose Python loops over the batch cost
        about 1 ms a step at 256 sequences (flashinfer 0.6.13 on an H100). CUDA-core decode always
        takes plan().
    """

    kv_write: Literal["native", "append"] = "native"
    tensor_cores: bool | Literal["auto"] = "auto"
    prefill_backend: Literal["auto", "fa2", "fa3"] = "auto"
    decode_plan: Literal["fast", "wrapper"] = "fast"


def use_tensor_cores(option: bool | str, num_q_heads: int, num_kv_heads: int) -> bool:
    """The tensor_cores option resolved for a model's head counts."""
    return num_q_heads // num_kv_heads > 4 if option == "auto" else bool(option)


def release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "0.7.2.post1" -> (0, 7, 2)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def unavailable_reason(
    version: str | None, cuda_available: bool, capability: tuple[int, int] | None
) -> str | None:
    """Why the backend cannot run here, in one line, or None.

    :param version: flashinfer-python's installed version; None when it is not installed.
    :param cuda_available: whether torch sees a CUDA device.
    :param capability: the CUDA device's compute capability (major, minor); None without CUDA.
    """
    if version is None:
        return "flashinfer-python is not installed (pip install flashinfer-python)"
    if release(version) < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        return f"flashinfer-python {version} is too old; needs {wanted} or newer"
    if not cuda_available or capability is None:
        return "needs a CUDA GPU; torch sees none"
    if capability < MIN_COMPUTE_CAPABILITY:
        have, need = ".".join(map(str, capability)), ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return f"needs compute capability {need} or newer (Ampere+); this GPU has {have}"
    return None
