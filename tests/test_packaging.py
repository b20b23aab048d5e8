"""Our five distributions as a user gets them: wheels built from this checkout, their metadata (README, licence,
classifiers, URLs, the core range a plugin needs, kernel libraries only at tested versions), and the native plugin
installed from that local wheelhouse into a fresh virtual environment, where `nova-ab backends` runs.

Nothing is downloaded: the wheels are built with the setuptools already installed, pip reads no index and no
configuration, and the fresh environment reuses this one's torch and the rest through a folder of links that leaves
out our own distributions (installed from the wheels instead) and the `ab` extra's MLflow, scipy and matplotlib
(which a backend plugin must not need).
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.message import Message
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("native", "cudnn", "flashinfer", "flashattn")
DISTRIBUTIONS = ("novainfer", *(f"novainfer-plugin-{p}" for p in PLUGINS))
AB_EXTRA = ("mlflow", "scipy", "matplotlib")
# The kernel libraries at the versions bench/RESULTS.md measured ("carried wheels", "Machine"), each with releases
# that were never run here and that a plugin must therefore refuse. (distribution, extra or None) -> requirement ->
# (tested, untested).
TESTED: dict[tuple[str, str | None], dict[str, tuple[str, list[str]]]] = {
    ("novainfer-plugin-flashinfer", None): {
        "flashinfer-python": ("0.6.13", ["0.6.12", "0.6.13.post1", "0.6.14", "0.7.2.post1", "0.7.4", "1.0.0"]),
        "apache-tvm-ffi": ("0.1.15.post2", ["0.1.15", "0.1.16", "0.2.0"]),
        "nvidia-cudnn-frontend": ("1.28.0", ["1.27.0", "1.28.1", "1.29.0"]),
    },
    ("novainfer-plugin-cudnn", None): {"nvidia-cudnn-frontend": ("1.28.0", ["1.27.0", "1.28.1", "1.29.0"])},
    ("novainfer-plugin-flashattn", "fa4"): {"flash-attn-4": ("4.0.0b15", ["4.0.0b16", "4.0.0b36", "4.0.0"])},
    ("novainfer-plugin-native", "triton"): {"triton": ("3.6.0", ["3.10.0", "4.0.0"])},
}


def _pip_env() -> dict[str, str]:
    """The environment without pip's configuration (this machine's has index mirrors and a folder of wheels), so
    that pip reads only what a test names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env or _pip_env()
    )


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels of the core and the four plugins, built offline from a copy of the checkout (a build leaves
    build/ and *.egg-info behind in its source tree)."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "core", source / "core", ignore=ignore)
    shutil.copytree(ROOT / "plugins", source / "plugins", ignore=ignore)  # each plugin's LICENSE link: its target
    wheels = tmp_path_factory.mktemp("wheelhouse")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels,
        source, *(source / "plugins" / p for p in PLUGINS),
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return wheels


def _wheel(wheelhouse: Path, dist: str) -> Path:
    (wheel,) = wheelhouse.glob(f"{dist.replace('-', '_')}-*.whl")
    return wheel


def metadata(wheelhouse: Path, dist: str) -> Message:
    with zipfile.ZipFile(_wheel(wheelhouse, dist)) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(wheel.read(name))


def requirements(meta: Message, extra: str | None = None) -> dict[str, Requirement]:
    """The distribution's requirements by name: the unconditional ones, or those of `extra` alone."""
    found = {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        in_extra = req.marker is not None and req.marker.evaluate({"extra": extra or ""})
        if (req.marker is None) if extra is None else in_extra:
            found[req.name] = req
    return found


def test_every_distribution_says_what_it_is_its_licence_and_where_it_lives(wheelhouse: Path) -> None:
    for dist in DISTRIBUTIONS:
        meta = metadata(wheelhouse, dist)
        assert meta["Name"] == dist and meta["Summary"]
        assert meta["Description-Content-Type"] == "text/markdown", dist
        title = "# NovaInfer" if dist == "novainfer" else f"# {dist}"
        assert meta.get_payload().startswith(title), f"{dist}: its README is not its description"
        assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"], dist
        with zipfile.ZipFile(_wheel(wheelhouse, dist)) as wheel:
            (licence,) = [n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
            assert b"Apache License\n                           Version 2.0" in wheel.read(licence), dist
        classifiers = meta.get_all("Classifier") or []
        assert {"Programming Language :: Python :: 3.11", "Development Status :: 3 - Alpha"} <= set(classifiers), dist
        urls = dict(line.split(", ", 1) for line in meta.get_all("Project-URL") or [])
        assert {"Homepage", "Source", "Issues"} <= set(urls) and all(u.startswith("https://") for u in urls.values())


def test_each_plugin_needs_a_core_of_its_contract_and_the_core_needs_no_tracking_server(wheelhouse: Path) -> None:
    core = metadata(wheelhouse, "novainfer")
    # The core's minor version is its backend contract (backend_api.CONTRACT_VERSION): 0.1.x is contract 2.
    major, minor = core["Version"].split(".")[:2]
    for plugin in PLUGINS:
        needs = requirements(metadata(wheelhouse, f"novainfer-plugin-{plugin}"))["novainfer"].specifier
        assert core["Version"] in needs and f"{major}.{minor}.99" in needs, (plugin, needs)
        next_contract, older = f"{major}.{int(minor) + 1}.0", f"{major}.{int(minor) - 1}.9"
        assert next_contract not in needs and older not in needs, (plugin, needs)
        assert not set(AB_EXTRA) & set(requirements(metadata(wheelhouse, f"novainfer-plugin-{plugin}")))
    assert not set(AB_EXTRA) & set(requirements(core)), "installing a backend plugin would pull nova-ab's tracking"
    ab = requirements(core, "ab")
    assert set(AB_EXTRA) <= set(ab)
    # 3.7 is the first MLflow whose client and `mlflow ui` default to ./mlflow.db (tracking.default_tracking_uri).
    assert "3.7.0" in ab["mlflow"].specifier and "3.6.0" not in ab["mlflow"].specifier


@pytest.mark.parametrize(("dist", "extra"), list(TESTED), ids=[f"{d}[{e}]" if e else d for d, e in TESTED])
def test_kernel_libraries_resolve_only_to_the_versions_that_were_measured(
    wheelhouse: Path, dist: str, extra: str | None
) -> None:
    needs = requirements(metadata(wheelhouse, dist), extra)
    for library, (tested, untested) in TESTED[dist, extra].items():
        specifier: SpecifierSet = needs[library].specifier
        admitted = list(specifier.filter([tested, *untested], prereleases=True))
        assert admitted == [tested], f"{dist}: {library}{specifier} admits {admitted}, measured: {tested}"


def _linked_site(base: Path) -> Path:
    """This environment's installed packages as links in `base`, less our own distributions (and any editable
    install's finder) and the `ab` extra's: what the fresh environment may reuse."""
    left_out = ("novainfer", "__editable__", "_novainfer", *AB_EXTRA)
    site = Path(sysconfig.get_paths()["purelib"])
    base.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(left_out) and entry.suffix != ".pth":
            (base / entry.name).symlink_to(entry)
    return base


def test_the_native_plugin_installs_from_the_wheelhouse_into_a_fresh_environment(
    wheelhouse: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(purelib, "reused.pth").write_text(f"{_linked_site(tmp_path / 'reused')}\n")
    installed = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--find-links", wheelhouse,
        "novainfer-plugin-native",
    )
    # With MLflow out of reach, this fails if the core (or the plugin) still required it.
    assert installed.returncode == 0, installed.stderr[-3000:]
    where = _run(python, "-c", "import json, novainfer, novainfer_native; "
                 "print(json.dumps([novainfer.__file__, novainfer_native.__file__]))")
    assert all(Path(f).is_relative_to(purelib) for f in json.loads(where.stdout)), where  # the wheels', not ours
    env = {**_pip_env(), "MLFLOW_DISABLE_TELEMETRY": "true"}
    listing = _run(venv / "bin" / "nova-ab", "backends", "--format", "json", cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr[-3000:]
    rows = {row["backend"]: row for row in json.loads(listing.stdout)}
    assert set(rows) == {"native", "reference"}, rows
    assert (rows["native"]["plugin"], rows["native"]["version"], rows["native"]["here"]) == (
        "novainfer-plugin-native", "0.1.0", "available"
    )
    table = _run(venv / "bin" / "nova-ab", "backends", cwd=tmp_path, env=env)
    assert table.returncode == 0 and "novainfer-plugin-native" in table.stdout, table.stderr[-3000:]
    # The sweep's side says what it lacks, in one line.
    (tmp_path / "x.toml").write_text("")
    sweep = _run(venv / "bin" / "nova-ab", "sweep", "x.toml", cwd=tmp_path, env=env)
    assert (sweep.returncode, sweep.stdout) == (2, "")
    assert sweep.stderr.splitlines() == [
        "nova-ab: `nova-ab sweep` needs scipy, matplotlib, of novainfer's `ab` extra: "
        "pip install 'novainfer[ab]'"
    ]
    check = _run(sys.executable, "-m", "pip", "--python", python, "check")
    assert not [line for line in check.stdout.splitlines() if line.startswith("novainfer")], check.stdout


def test_the_store_lock_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = _run("git", "-C", ROOT, "check-ignore", "mlflow.db", "mlflow.db.lock", env=dict(os.environ))
    assert ignored.stdout.split() == ["mlflow.db", "mlflow.db.lock"]
