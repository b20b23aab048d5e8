"""Finding backends: the registry, built once per process from entry points, and the engine's one-backend
plugin manager.

Each plugin is loaded on its own and checked as pytest checks its plugins (`check_pending`: every hookimpl
names a novainfer hook); one that fails to load (an import error, a raising register_backends, a misspelled
hook, a bad option type, a taken name) is recorded as broken with its one-line reason, and every other backend
is found as usual. Loading is cached for the process: an engine, its correctness gate and the checks around
them share one discovery.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from importlib import import_module
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

import pluggy
import torch

from novainfer import backend_api
from novainfer.backend_api import CONTRACT_VERSION, BackendError, BackendSpec, StepBatch, hookimpl
from novainfer.backend_check import create_checked, default_reason
from novainfer.backend_options import schema_problem
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
# The hooks a plugin may implement: what a misspelled one is matched against.
HOOKS = tuple(name for name in dir(backend_api) if hasattr(getattr(backend_api, name), "novainfer_spec"))


@dataclass(frozen=True)
class RegisteredBackend:
    """A backend found by discovery. spec: as its plugin declared it, except that `create` first parses the
    options and checks the settings (novainfer.backend_check.create_checked), for every caller alike."""

    spec: BackendSpec
    plugin: str  # the distribution that provides it, or "in-process"
    version: str

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin that failed to load. entry_point: its name in the `novainfer` group (by convention
    the backend's); reason: what went wrong, in one line."""

    plugin: str
    version: str
    entry_point: str
    reason: str


@dataclass(frozen=True)
class Registry:
    """What discovery found: the backends by name, and the plugins that failed to load."""

    backends: dict[str, RegisteredBackend]
    broken: tuple[BrokenPlugin, ...] = ()


class SettingsError(BackendError):
    """Settings that are wrong for the backend on any machine; `setting` names the EngineConfig field at fault
    ("backend": an unknown name or settings it does not support; "backend_options": an option)."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(problem)
        self.setting = setting


def one_line(error: BaseException) -> str:
    """An exception as one line: ours as they are, a plugin's own with its type ("ImportError: ...")."""
    text = str(error) if isinstance(error, BackendError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def _load(
    plugin: object, dist: str, dist_version: str, taken: Mapping[str, RegisteredBackend]
) -> dict[str, RegisteredBackend]:
    """The backends `plugin` registers, all or none: BackendError (one line) when a hookimpl is not a novainfer
    hook, a backend was written for another contract (or says for none), an options type is not one the core
    can parse, or a name is taken (by `taken` or twice by itself)."""
    pm = pluggy.PluginManager("novainfer")
    pm.add_hookspecs(backend_api)
    try:
        pm.register(plugin)
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        raise BackendError(_hook_problem(pm, plugin, error)) from None
    found: dict[str, RegisteredBackend] = {}

    def register(spec: BackendSpec) -> None:
        owner = found.get(spec.name) or taken.get(spec.name)
        if owner is not None:
            raise BackendError(f"backend {spec.name!r} is registered twice ({owner.plugin} and {dist})")
        if spec.contract_version != CONTRACT_VERSION:
            raise BackendError(_contract_problem(spec, dist))
        problem = schema_problem(spec.options)
        if problem:
            raise BackendError(f"backend {spec.name!r}: {problem}")
        found[spec.name] = RegisteredBackend(replace(spec, create=partial(create_checked, spec)), dist, dist_version)

    pm.hook.register_backends(register=register)
    return found


def _contract_problem(spec: BackendSpec, dist: str) -> str:
    """Why a backend of another contract than the core's is refused, naming both versions."""
    core = f"this core (novainfer {_core_version()}) implements backend contract {CONTRACT_VERSION}"
    if spec.contract_version is None:
        return (
            f"backend {spec.name!r} of {dist} declares no contract_version; {core} "
            f"(BackendSpec(contract_version={CONTRACT_VERSION}) once it follows novainfer.backend_api)"
        )
    return f"backend {spec.name!r} of {dist} was written for backend contract {spec.contract_version}; {core}"


def _hook_problem(pm: pluggy.PluginManager, plugin: object, error: pluggy.PluginValidationError) -> str:
    """A hook validation error in one line: the unknown hook with the likeliest meant one, else pluggy's own."""
    unknown = sorted(caller.name for caller in pm.get_hookcallers(plugin) or () if not caller.has_spec())
    if not unknown:
        return one_line(error)
    meant = difflib.get_close_matches(unknown[0], HOOKS, n=1)
    hint = f" (did you mean {meant[0]}?)" if meant else f"; hooks: {', '.join(HOOKS)}"
    return f"{', '.join(unknown)} is not a novainfer hook{hint}"


@cache
def _core() -> dict[str, RegisteredBackend]:
    """The core's own backends, without loading any plugin module."""
    found: dict[str, RegisteredBackend] = {}
    for module in CORE_PLUGINS:
        found |= _load(import_module(module), "novainfer (core)", _core_version(), found)
    return found


@cache
def _installed() -> Registry:
    """Every installed plugin, loaded once per process; one that fails is recorded, never raised."""
    backends: dict[str, RegisteredBackend] = {}
    broken: list[BrokenPlugin] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist, dist_version = (ep.dist.name, ep.dist.version) if ep.dist else (ep.name, "unknown")
        try:
            backends |= _load(ep.load(), dist, dist_version, {**_core(), **backends})
        except Exception as error:  # a plugin's own code may raise anything; it must not take the others down
            broken.append(BrokenPlugin(dist, dist_version, ep.name, one_line(error)))
    return Registry(backends, tuple(broken))


def registry(extra_plugins: Sequence[object] = (), installed: bool = True) -> Registry:
    """The core's backends, the installed plugins' (unless `installed` is False: then no plugin module is
    loaded) and those of `extra_plugins`, registered in-process (a problem with one of these raises)."""
    backends = dict(_core())
    broken: tuple[BrokenPlugin, ...] = ()
    if installed:
        backends |= _installed().backends
        broken = _installed().broken
    for plugin in extra_plugins:
        backends |= _load(plugin, "in-process", "", backends)
    return Registry(backends, broken)


def discover_backends(extra_plugins: Sequence[object] = (), installed: bool = True) -> dict[str, RegisteredBackend]:
    """The backends of `registry(extra_plugins, installed)`, by name."""
    return registry(extra_plugins, installed).backends


def _core_version() -> str:
    try:
        return version("novainfer")
    except PackageNotFoundError:
        return "unknown"


def find_backend(name: str, found: Registry, listing: str) -> RegisteredBackend:
    """The backend `name` of `found`, or one line saying why there is none: BackendError when it cannot be had
    on this machine (its plugin is not installed, or failed to load), SettingsError when no plugin has it, whose
    message offers `listing` ("available backends: ...") instead."""
    if name in found.backends:
        return found.backends[name]
    for plugin in found.broken:
        if name in (plugin.entry_point, *(b for b, d in FIRST_PARTY_PLUGINS.items() if d == plugin.plugin)):
            raise BackendError(
                f"backend {name!r} is not available: plugin {plugin.plugin} failed to load: {plugin.reason}"
            )
    if name in FIRST_PARTY_PLUGINS:
        raise BackendError(f"backend {name!r} is not installed (pip install {FIRST_PARTY_PLUGINS[name]})")
    broken = "".join(f"; plugin {p.plugin} failed to load: {p.reason}" for p in found.broken)
    raise SettingsError("backend", f"unknown backend {name!r}; {listing}{broken}")


def select_backend(
    name: str, device: torch.device, dtype: torch.dtype, block_size: int, extra_plugins: Sequence[object] = ()
) -> RegisteredBackend:
    """The registered backend `name`, if anything of it runs on this machine at these settings; one-line
    errors that list the backends that do. The settings an engine creates it with are judged when it is
    created (RegisteredBackend.spec.create)."""
    # The core's own backends run without loading any plugin module.
    found = registry(installed=False) if name in _core() and not extra_plugins else registry(extra_plugins)
    usable = sorted(n for n, b in found.backends.items() if default_reason(b.spec, device, dtype, block_size) is None)
    listing = f"available backends: {', '.join(usable) or 'none'}"
    try:
        backend = find_backend(name, found, listing)
    except SettingsError:
        raise
    except BackendError as missing:
        raise BackendError(f"{missing}; {listing}") from None
    reason = default_reason(backend.spec, device, dtype, block_size)
    if reason:
        raise BackendError(f"backend {name!r} is not available: {reason}; {listing}")
    return backend


class CoreDefaults:
    """The core's fallback implementations, registered to run after the backend's: a backend that returns None
    from a hook (or leaves it out) gets the core's indexed KV scatter and its plain-PyTorch attention in the
    cache's dtype (novainfer.reference)."""

    @hookimpl(trylast=True)
    def prepare_attention_metadata(self, batch: StepBatch) -> ReferenceMetadata:
        return reference_metadata(batch)

    @hookimpl(trylast=True)
    def attention(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: ReferenceMetadata, scale: float,
        output: torch.Tensor,
    ) -> bool:
        reference_attention(query, kv_cache, metadata, scale, exact=False, out=output)
        return True

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
