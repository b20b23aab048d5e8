"""The commands nova-ab prints for the user to run next, spelled so that they run as printed where it runs.

After the README's set-up nothing is on PATH: `nova-ab` and `mlflow` are `.venv/bin/nova-ab` and
`.venv/bin/mlflow`. So a printed command names a program the way this shell reaches it: bare where PATH finds
that very file, else by its path (relative to the working directory when it lies below it). `nova-ab` is the
program this process was started as (sys.argv[0]), or `<python> -m novainfer.ab.sweep.cli` when it was run as a
module; `mlflow` is the script installed beside the running interpreter.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

CLI_MODULE = "novainfer.ab.sweep.cli"


def reach(program: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """How the user's shell reaches `program` (a path): its bare name when PATH finds that file, else its path
    relative to `cwd` when below it ("./x" for a file in it, so the shell does not search PATH), else absolute."""
    path = Path(program)
    cwd = cwd or Path.cwd()
    found = shutil.which(path.name)
    absolute = path if path.is_absolute() else cwd / path
    if found is not None and _same(Path(found), absolute):
        return path.name
    try:
        relative = absolute.relative_to(cwd)
    except ValueError:
        return shlex.quote(str(absolute))
    text = str(relative)
    return shlex.quote(text if os.sep in text else f".{os.sep}{text}")


def nova_ab(argv0: str | None = None, cwd: Path | None = None) -> str:
    """The command that runs nova-ab as this process was run (`.venv/bin/nova-ab`, `nova-ab`, `python -m ...`)."""
    argv0 = argv0 if argv0 is not None else sys.argv[0]
    if not argv0 or argv0.endswith(".py") or argv0 == "-m" or argv0 == "-c":
        return f"{reach(sys.executable, cwd)} -m {CLI_MODULE}"
    return reach(argv0, cwd)


def mlflow(cwd: Path | None = None) -> str:
    """The mlflow command of this environment (the script beside the running interpreter), or `mlflow` from
    PATH when this environment has none."""
    script = Path(sys.executable).parent / "mlflow"  # not resolved: a venv's python is a link out of the venv
    return reach(script, cwd) if script.exists() else "mlflow"


def join(*parts: str | os.PathLike[str]) -> str:
    """Arguments quoted for the shell, after a command from nova_ab() or mlflow() (already quoted)."""
    return " ".join(shlex.quote(str(part)) for part in parts)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False
