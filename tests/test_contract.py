"""The backend contract is one module: every plugin of this repository imports nothing else of NovaInfer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = "novainfer.backend_api"


def novainfer_imports(path: Path) -> set[str]:
    """The novainfer modules a file imports (at any depth: imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from novainfer import x` names a module or an attribute of the package: both are the core's.
            if node.module == "novainfer":
                found |= {f"novainfer.{alias.name}" for alias in node.names}
    return {name for name in found if name == "novainfer" or name.startswith("novainfer.")}


def test_plugins_import_the_contract_module_only() -> None:
    files = sorted((ROOT / "plugins").glob("**/*.py"))
    assert len(files) > 10, "the plugins' sources were not found"
    offending = {str(f.relative_to(ROOT)): sorted(novainfer_imports(f) - {CONTRACT}) for f in files}
    assert not {f: mods for f, mods in offending.items() if mods}


def test_the_check_sees_an_import_of_the_core_anywhere(tmp_path: Path) -> None:
    source = tmp_path / "plugin.py"
    source.write_text(
        "from novainfer.backend_api import hookimpl\n"
        "def create():\n    from novainfer.reference import reference_attention\n"
        "import novainfer.plugins\nfrom novainfer import engine\n"
    )
    assert novainfer_imports(source) - {CONTRACT} == {
        "novainfer.reference", "novainfer.plugins", "novainfer", "novainfer.engine"
    }


def declared_contracts(path: Path) -> list[object]:
    """What each BackendSpec(...) call in a file passes as contract_version: an int for a literal, the source text
    of anything else, None where it passes none."""
    found: list[object] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "BackendSpec":
            value = next((k.value for k in node.keywords if k.arg == "contract_version"), None)
            literal = isinstance(value, ast.Constant) and isinstance(value.value, int)
            found.append(value.value if literal else None if value is None else ast.unparse(value))
    return found


def test_every_plugin_of_this_repository_registers_for_the_cores_contract_as_a_literal() -> None:
    from novainfer.backend_api import CONTRACT_VERSION

    # A plugin's own number, never backend_api.CONTRACT_VERSION: that would agree with any core it ran on.
    files = sorted((ROOT / "plugins").glob("*/novainfer_*/__init__.py")) + sorted(
        (ROOT / "tests" / "plugins").glob("*/novainfer_*.py")
    )
    declared = {str(f.relative_to(ROOT)): declared_contracts(f) for f in files}
    assert sum(len(d) for d in declared.values()) >= 9, declared  # four real backends, five test plugins
    assert {f: d for f, d in declared.items() if d and set(d) != {CONTRACT_VERSION}} == {}
