"""A plugin that records every time a registry loads it: one line, the process id, appended to the file
$NOVAINFER_COUNT_FILE names (nothing without it), so a test can count discoveries per process."""

from __future__ import annotations

import os
from collections.abc import Callable

from novainfer.backend_api import BackendSpec, Capabilities, hookimpl


@hookimpl
def register_backends(register: Callable[[BackendSpec], None]) -> None:
    count_file = os.environ.get("NOVAINFER_COUNT_FILE")
    if count_file:
        with open(count_file, "a") as out:
            out.write(f"{os.getpid()}\n")
    register(BackendSpec("counted", object, Capabilities(devices=("cpu",), dtypes=("float32",)), contract_version=2))
