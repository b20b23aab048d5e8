"""A plugin whose hookimpl misses an "s" (register_backend): pluggy alone would register nothing and say nothing;
the registry's check_pending makes it a broken plugin that names the hook it meant."""

from __future__ import annotations

from collections.abc import Callable

from novainfer.backend_api import BackendSpec, Capabilities, hookimpl


@hookimpl
def register_backend(register: Callable[[BackendSpec], None]) -> None:
    register(BackendSpec("misspelled", object, Capabilities(devices=("cpu",), dtypes=("float32",)), contract_version=2))
