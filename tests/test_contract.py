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
