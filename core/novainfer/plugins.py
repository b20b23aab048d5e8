"""Finding backends: the registry built from entry points, and the engine's one-backend plugin manager."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

import pluggy
import torch

from novainfer import backend_api
from novainfer.backend_api import BackendError, BackendSpec, StepBatch, hookimpl
from novainfer.reference import ReferenceMetadata, reference_attention, reference_metadata

ENTRY_POINT_GROUP = "novainfer"
# The core's own backends, registered like pytest's built-in plugins: always present, found without loading
# any entry point, and a plugin registering one of their names is refused.
CORE_PLUGINS = ("novainfer.reference",)
# Backends this project ships as separate distributions: naming one that is not installed says
# what to install rather than "unknown backend".
FIRST_PARTY_PLUGINS = {
    "native": "novainfer-plugin-native",
    "cudnn": "novainfer-plugin-cudnn",
    "flashattn": "novainfer-plugin-flashattn",
    "flashinfer": "novainfer-plugin-flashinfer",
}


@dataclass(frozen=True)
class RegisteredBackend:
    spec: BackendSpec
    plugin: str  # the distribution that provides it, or "in-process"
    version: str

    @property
    def name(self) -> str:
        return self.spec.name


def discover_backends(extra_plugins: Sequence[object] = (), installed: bool = True) -> dict[str, RegisteredBackend]:
    """Every backend of the core, of installed plugins (entry-point group `novainfer`, unless `installed` is
    False: then no plugin module is loaded) and of `extra_plugins`."""
    found: dict[str, RegisteredBackend] = {}

    def collect(plugin: object, dist_name: str, version: str) -> None:
        pm = pluggy.PluginManager("novainfer")
        pm.add_hookspecs(backend_api)
        pm.register(plugin)

        def register(spec: BackendSpec) -> None:
            if spec.name in found:
                raise BackendError(
                    f"backend {spec.name!r} is registered twice ({found[spec.name].plugin} and {dist_name})"
                )
            found[spec.name] = RegisteredBackend(spec, dist_name, version)

        pm.hook.register_backends(register=register)

    for module in CORE_PLUGINS:
        collect(import_module(module), "novainfer (core)", _core_version())
    if installed:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            collect(ep.load(), dist.name if dist else ep.name, dist.version if dist else "unknown")
    for plugin in extra_plugins:
        collect(plugin, "in-process", "")
    return found


def _core_version() -> str:
    try:
        return version("novainfer")
    except PackageNotFoundError:
        return "unknown"


def unsupported_reason(spec: BackendSpec, device: torch.device, dtype: torch.dtype, block_size: int) -> str | None:
    """Why `spec` cannot run here with these settings, or None."""
    reason = spec.unavailable()
    if reason:
        return reason
    caps = spec.capabilities
    if device.type not in caps.devices:
        return f"runs on {', '.join(caps.devices)}, not {device.type}"
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in caps.dtypes:
        return f"supports dtypes {', '.join(caps.dtypes)}, not {dtype_name}"
    if caps.block_sizes is not None and block_size not in caps.block_sizes:
        return f"supports block sizes {', '.join(map(str, caps.block_sizes))}, not {block_size}"
    return None


def select_backend(
    name: str, device: torch.device, dtype: torch.dtype, block_size: int, extra_plugins: Sequence[object] = ()
) -> RegisteredBackend:
    """The registered backend `name`, checked against this machine and settings; one-line errors."""
    core = discover_backends(installed=False)
    # The core's own backends run without loading any plugin module.
    backends = core if name in core and not extra_plugins else discover_backends(extra_plugins)
    usable = sorted(n for n, b in backends.items() if not unsupported_reason(b.spec, device, dtype, block_size))
    listing = ", ".join(usable) or "none"
    if name not in backends:
        if name in FIRST_PARTY_PLUGINS:
            raise BackendError(
                f"backend {name!r} is not installed (pip install {FIRST_PARTY_PLUGINS[name]}); "
                f"available backends: {listing}"
            )
        raise BackendError(f"unknown backend {name!r}; available backends: {listing}")
    reason = unsupported_reason(backends[name].spec, device, dtype, block_size)
    if reason:
        raise BackendError(f"backend {name!r} is not available: {reason}; available backends: {listing}")
    return backends[name]


class CoreDefaults:
    """The core's fallback implementations, registered to run after the backend's: a backend that returns None
    from a hook (or leaves it out) gets the core's indexed KV scatter and its plain-PyTorch attention in the
    cache's dtype (novainfer.reference)."""

    @hookimpl(trylast=True)
    def prepare_attention_metadata(self, batch: StepBatch) -> ReferenceMetadata:
        return reference_metadata(batch)

    @hookimpl(trylast=True)
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: ReferenceMetadata, scale: float
    ) -> torch.Tensor:
        return reference_attention(query, kv_cache, metadata, scale, exact=False)

    @hookimpl(trylast=True)
    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> bool:
        scatter_kv(key, value, kv_cache, slot_mapping)
        return True


def scatter_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """One indexed copy per tensor: token i goes to flat slot slot_mapping[i] (block * block_size + offset)."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def engine_plugin_manager(backend: object, observers: Sequence[object] = ()) -> pluggy.PluginManager:
    """The engine's plugin manager: the chosen backend, the core defaults and any observers."""
    pm = pluggy.PluginManager("novainfer")
    pm.add_hookspecs(backend_api)
    pm.register(CoreDefaults(), name="core-defaults")
    pm.register(backend, name="backend")
    for observer in observers:
        pm.register(observer)
    pm.check_pending()
    return pm


def resolve_hook(pm: pluggy.PluginManager, name: str, observed: bool = True) -> Callable[..., Any]:
    """A callable for a firstresult hook, resolved once so per-layer calls skip pluggy's dispatch.

    With hook wrappers registered (observers) and `observed`, the full pluggy call is kept so they
    see every call; otherwise the plain implementations are called directly, in pluggy's order,
    until one answers.
    """
    caller = getattr(pm.hook, name)
    impls = caller.get_hookimpls()
    is_wrapper = [impl.hookwrapper or impl.wrapper for impl in impls]
    if observed and any(is_wrapper):
        return caller
    # An implementation may take a subset of the hook's arguments, as pluggy allows.
    ordered = [
        (impl.function, impl.argnames)
        for impl, wraps in zip(reversed(impls), reversed(is_wrapper))
        if not wraps
    ]

    def first_result(**kwargs: Any) -> Any:
        for function, argnames in ordered:
            result = function(*[kwargs[name] for name in argnames])
            if result is not None:
                return result
        return None

    return first_result
