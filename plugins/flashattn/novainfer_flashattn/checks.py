"""What must hold before the flashattn backend is built: its options' type, the block-size rule of the
generation asked for, and a FlashAttention generation that runs on this GPU with this block size.

Pure functions of plain values (installed versions, compute capability, block size), so they import
neither FlashAttention nor CUDA and are tested on any machine; ``novainfer_flashattn.__init__``
gathers the facts they judge.

The two generations:
    "4": flash-attn-4 (PyPI ``flash-attn-4``, module ``flash_attn.cute``): kernels compiled at first use
        through the CUTLASS Python DSL; paged KV on compute capability 9.x (Hopper) and 10.x/11.x
        (Blackwell), any page size.
    "2": flash-attn 2.x (PyPI ``flash-attn``, built from source): compute capability 8.0 or newer; its
        paged kernels take a page (our block) of a multiple of 256 tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from packaging.version import InvalidVersion, Version

from novainfer.backend_api import Settings

# The first flash-attn-4 with paged KV on Hopper (4.0.0b3 asserts "paged KV not supported on SM 9.0").
MIN_FA4 = "4.0.0b5"
# flash-attn-4's paged forward: Hopper (9.x) and datacenter Blackwell (10.x, 11.x); its sm80 and
# sm120 forwards take no page table.
FA4_MAJORS = (9, 10, 11)
MIN_FA2 = "2.6"
FA2_MIN_CAPABILITY = (8, 0)
# flash-attn 2's paged kernels check `page_block_size % 256 == 0` and raise otherwise.
FA2_PAGE_MULTIPLE = 256

INSTALL = {
    "4": "pip install 'novainfer-plugin-flashattn[fa4]'",
    "2": "pip install --no-build-isolation 'novainfer-plugin-flashattn[fa2]'",
}


@dataclass(frozen=True)
class Options:
    """The backend's options (``backend_options`` in the engine config); the core parses the arm's table
    into this type.

    generation: which FlashAttention runs: "4" (flash-attn-4), "2" (flash-attn 2.x), or "auto": 4 where
        it can run here (installed, Hopper or Blackwell), else 2 (installed, Ampere+, block size a
        multiple of 256). A generation that cannot run is an error with its reason, never replaced by
        the other.
    """

    # A config file may well say generation = 4: the number means the same generation, kept as its string.
    generation: Literal["auto", "4", "2", 4, 2] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "generation", str(self.generation))


def check(settings: Settings) -> str | None:
    """The settings rule (`BackendSpec.check`): flash-attn 2, when asked for by name, pages the cache only in
    blocks of a multiple of 256 tokens, on any machine. ("auto" may still pick 4 where it runs.)"""
    return block_size_reason(settings.block_size) if settings.options.generation == "2" else None


def _too_old(name: str, version: str, minimum: str) -> str | None:
    try:
        if Version(version) >= Version(minimum):
            return None
    except InvalidVersion:
        return f"{name} reports an unreadable version {version!r}; needs {minimum} or newer"
    return f"{name} {version} is too old; needs {minimum} or newer"


def _capability(capability: tuple[int, int]) -> str:
    return ".".join(map(str, capability))


def block_size_reason(block_size: int) -> str | None:
    """flash-attn 2's rule for a paged cache, as a reason, or None when `block_size` obeys it."""
    if block_size % FA2_PAGE_MULTIPLE == 0:
        return None
    return (
        f"flash-attn 2 pages the KV cache only in blocks of a multiple of {FA2_PAGE_MULTIPLE} tokens, "
        f"not {block_size} (flash-attn-4 takes any block size)"
    )


def generation_reason(
    generation: str, version: str | None, capability: tuple[int, int] | None, block_size: int | None
) -> str | None:
    """Why one generation cannot run here, in one line, or None.

    :param generation: "4" or "2".
    :param version: its package's installed version; None when it is not installed.
    :param capability: the CUDA device's compute capability (major, minor); None without CUDA.
    :param block_size: the engine's KV block size; None to leave the block-size rule out (the backend
        registry asks before a block size is known).
    """
    if generation == "4":
        if version is None:
            return f"flash-attn-4 is not installed ({INSTALL['4']})"
        old = _too_old("flash-attn-4", version, MIN_FA4)
        if old:
            return old
        if capability is None:
            return "needs a CUDA GPU; torch sees none"
        if capability[0] not in FA4_MAJORS:
            return (
                "flash-attn-4 pages the KV cache on compute capability 9.x (Hopper) and 10.x/11.x (Blackwell) "
                f"only; this GPU has {_capability(capability)}"
            )
        return None
    if version is None:
        return f"flash-attn is not installed ({INSTALL['2']})"
    old = _too_old("flash-attn", version, MIN_FA2)
    if old:
        return old
    if capability is None:
        return "needs a CUDA GPU; torch sees none"
    if capability < FA2_MIN_CAPABILITY:
        return (
            f"flash-attn 2 needs compute capability {_capability(FA2_MIN_CAPABILITY)} or newer (Ampere+); "
            f"this GPU has {_capability(capability)}"
        )
    return block_size_reason(block_size) if block_size is not None else None


def choose_generation(
    generation: str,
    fa4_version: str | None,
    fa2_version: str | None,
    capability: tuple[int, int] | None,
    block_size: int | None,
) -> tuple[str | None, str | None]:
    """The generation to run and None, or None and why none can run (one line).

    :param generation: the option: "auto", "4" or "2".
    Other parameters as in :func:`generation_reason`.
    """
    versions = {"4": fa4_version, "2": fa2_version}
    candidates = ("4", "2") if generation == "auto" else (generation,)
    reasons = {g: generation_reason(g, versions[g], capability, block_size) for g in candidates}
    for g in candidates:
        if reasons[g] is None:
            return g, None
    if generation != "auto":
        return None, reasons[generation]
    installed = [g for g in candidates if versions[g] is not None]
    if not installed:
        return None, (
            f"neither flash-attn-4 nor flash-attn is installed ({INSTALL['4']} for Hopper/Blackwell, "
            f"{INSTALL['2']} for Ampere+)"
        )
    if len(installed) == 1:
        return None, reasons[installed[0]]
    return None, f"flash-attn-4: {reasons['4']}; flash-attn: {reasons['2']}"
