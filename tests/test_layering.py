"""The house reads top-down: no import cycles, the sweep side above the trial side above the engine, and the sweep
process free of torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "core" / "novainfer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    """The novainfer modules `path` imports: at module level (outside `if TYPE_CHECKING:`), or anywhere."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = module_level(tree.body) if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    modules = {module_name(p) for p in PACKAGE.glob("**/*.py")}
    return {name for name in found if name in modules}


def module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run when the module is imported: not in functions or classes, nor under TYPE_CHECKING."""
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            found += module_level(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            found += module_level(node.body) + module_level(getattr(node, "orelse", []))
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append(node)
    return found


def graph(top_level_only: bool) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p, top_level_only) - {module_name(p)} for p in PACKAGE.glob("**/*.py")}


def test_no_module_imports_itself_back() -> None:
    """No cycle among module-level imports, anywhere in core/ (ab/ included)."""
    edges = graph(top_level_only=True)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_layers_point_down() -> None:
    """The sweep side uses the trial side only through the peer registry; the trial side never uses the sweep
    side; what crosses between them (wire, workload) and the engine use neither; the contract uses no core."""
    edges = graph(top_level_only=False)
    below_both = {"novainfer.ab.wire", "novainfer.ab.workload"}
    for module, imported in edges.items():
        if module.startswith("novainfer.ab.sweep"):
            assert {m for m in imported if m.startswith("novainfer.ab.trial")} <= {"novainfer.ab.trial.peers"}, module
        if module.startswith("novainfer.ab.trial"):
            assert not {m for m in imported if m.startswith("novainfer.ab.sweep")}, module
        if module in below_both:
            assert not {m for m in imported if m.startswith(("novainfer.ab.sweep", "novainfer.ab.trial"))}, module
        if not module.startswith("novainfer.ab"):
            assert not {m for m in imported if m.startswith("novainfer.ab")}, module


def test_the_sweep_process_imports_no_torch(tmp_path: Path) -> None:
    """Every module of the sweep side, and `nova-ab compare` run to its end, in one fresh interpreter."""
    sweep = sorted(module_name(p) for p in (PACKAGE / "ab" / "sweep").glob("*.py"))
    script = (
        "import importlib, sys\n"
        f"for name in {sweep!r}: importlib.import_module(name)\n"
        "from novainfer.ab.sweep.cli import main\n"
        "try:\n    main(['compare'])\nexcept SystemExit:\n    pass\n"
        "print(__import__('json').dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True
    )
    assert len(sweep) >= 10
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_trial_and_its_gate_run_with_native_uninstalled(
    tmp_path: Path, pip_install: Callable[[Path], Path]
) -> None:
    """An environment like the user's that never installed novainfer-plugin-native: the site-packages of this
    one with native's distribution left out (linked entry by entry), the interpreter started without site. A
    third-party backend's trial runs its gate (the core's reference needs no plugin) and ends "ok"."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for entry in site.iterdir():
        if "novainfer_plugin_native" not in entry.name and not entry.name.endswith(".pth"):
            (shadow / entry.name).symlink_to(entry)
    example = pip_install(ROOT / "tests" / "plugins" / "example")
    script = (
        "import importlib.util, json\n"
        "from novainfer.ab.trial.procedure import run_trial\n"
        "from novainfer.ab.wire import GateSettings, TrialRequest, new_record\n"
        "from novainfer.ab.workload import Workload\n"
        "from novainfer.config import EngineConfig\n"
        "config = EngineConfig(model='random:qwen2-tiny-wide', backend='example', device='cpu', dtype='float32',\n"
        "    max_model_len=96, max_num_seqs=4, max_num_batched_tokens=48, kv_cache_capacity=512)\n"
        "request = TrialRequest(sweep_id='s', trial_id='t#0', arm='t', arm_params={}, repeat=0, order=0,\n"
        "    config=config.to_dict(), workload=Workload(4, (16, 40), (4, 12)), warmup_seqs=1,\n"
        "    gate=GateSettings(), result_path='', source_dir='.')\n"
        "record = new_record(request)\n"
        "run_trial(request, record)\n"
        "print(json.dumps([importlib.util.find_spec('novainfer_native') is None, record.status, record.reason,\n"
        "    record.metrics.get('gate_steps', 0), record.metrics.get('gate_worst_ratio')]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": f"{example}:{ROOT / 'core'}:{shadow}", "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    native_absent, status, reason, gate_steps, worst = json.loads(done.stdout.strip().splitlines()[-1])
    assert native_absent and status == "ok", reason
    assert gate_steps > 0 and worst <= 1
