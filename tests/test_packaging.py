"""Packaging: declared ranges vs the lock files, one version string, the command table on the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import eagle

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

#: Each lock file (its own lines, without what it includes with -r) and the declaration it pins.
LOCKS: dict[str, str] = {
    "requirements-base.txt": "dependencies",
    "requirements.txt": "cpu",
    "requirements-gpu.txt": "gpu",
    "requirements-dev.txt": "dev",
}

#: Every subcommand `eagle --help` must list (CLI compatibility).
SUBCOMMANDS = (
    "build-bank",
    "score",
    "warm-cache",
    "bank",
    "serve",
    "watch",
    "audit",
    "eval",
    "eval-merge",
    "app",
    "doctor",
)


def _pins(filename: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in (ROOT / filename).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{filename}: {line!r} is not an exact pin (the lock files pin exactly)"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _declared(group: str) -> dict[str, Requirement]:
    lines = PROJECT["dependencies"] if group == "dependencies" else PROJECT["optional-dependencies"][group]
    return {canonicalize_name(req.name): req for req in map(Requirement, lines)}


@pytest.mark.parametrize(("lock", "group"), LOCKS.items())
def test_the_lock_file_and_the_declared_ranges_agree(lock, group):
    """Every pin is declared and admitted by its range; every declaration is pinned and capped."""
    pins, declared = _pins(lock), _declared(group)
    missing, unpinned = sorted(set(pins) - set(declared)), sorted(set(declared) - set(pins))
    assert not missing, f"{lock} pins {missing}, which pyproject's {group} does not declare"
    assert not unpinned, f"pyproject's {group} declares {unpinned}, which {lock} does not pin"
    for name, version in pins.items():
        spec = declared[name].specifier
        assert spec.contains(version, prereleases=True), f"{lock}: {name}=={version} is outside pyproject's {spec}"
        assert any(s.operator in ("<", "<=", "~=") for s in spec), f"pyproject's {group}: {name} has no cap"
        assert any(s.operator in (">", ">=", "~=") for s in spec), f"pyproject's {group}: {name} has no floor"


def test_the_ray_extra_admits_the_pinned_ray():
    (req,) = map(Requirement, PROJECT["optional-dependencies"]["ray"])
    assert req.specifier.contains(_pins("requirements-dev.txt")["ray"])


def test_torch_is_capped_below_the_next_minor():
    spec = _declared("dependencies")["torch"].specifier
    assert spec.contains("2.14.1") and not spec.contains("2.15.0")


def test_cpu_and_gpu_builds_are_alternatives_never_defaults():
    base = set(_declared("dependencies"))
    assert base.isdisjoint(_declared("cpu")) and base.isdisjoint(_declared("gpu"))
    assert set(_declared("cpu")).isdisjoint(_declared("gpu"))


def test_the_version_is_one_string():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "eagle.__version__"}
    assert Version(eagle.__version__)
    init = (ROOT / "eagle" / "__init__.py").read_text(encoding="utf-8")
    assert len(re.findall(r"__version__\s*=", init)) == 1
    written = [
        path.relative_to(ROOT)
        for package in ("app", "deploy", "eagle", "expert", "mllm", "common")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py" or path.parent.name != "eagle"
        if re.search(r"""(__version__|version)\s*=\s*["']\d+\.\d+""", path.read_text(encoding="utf-8"))
    ]
    assert not written, f"a second version string in {written}"


def test_every_data_file_the_packages_read_is_package_data():
    from fnmatch import fnmatch

    declared = PYPROJECT["tool"]["setuptools"].get("package-data", {})
    suffixes = (".json", ".yaml", ".yml", ".txt", ".css", ".js", ".html")
    missing, found = [], 0
    for package in ("app", "deploy", "eagle", "expert", "mllm", "common"):
        for path in (ROOT / package).rglob("*"):
            if not path.is_file() or path.suffix not in suffixes or "__pycache__" in path.parts or "k8s" in path.parts:
                continue
            found += 1
            name = path.relative_to(ROOT / package).as_posix()
            if not any(fnmatch(name, pattern) for pattern in declared.get(package, [])):
                missing.append(f"{package}/{name}")
    assert found, "expected at least mllm/configs/*.json"
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def _eagle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eagle", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def test_eagle_version_prints_the_version():
    done = _eagle("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"eagle {eagle.__version__}"


def test_eagle_help_lists_every_subcommand():
    done = _eagle("--help")
    assert done.returncode == 0, done.stderr
    listed = set(re.findall(r"^    ([a-z][a-z-]+)\s", done.stdout, flags=re.MULTILINE))
    assert set(SUBCOMMANDS) <= listed, f"missing from eagle --help: {sorted(set(SUBCOMMANDS) - listed)}"


def test_eagle_version_and_help_import_no_command_module():
    code = (
        "import sys; from eagle.cli import main; from eagle.cli_table import command_module_names; "
        "code = main(sys.argv[1:]); "
        "loaded = [m for m in (*command_module_names(), 'torch', 'numpy', 'pydantic') if m in sys.modules]; "
        "print(loaded, file=sys.stderr); assert not loaded, loaded"
    )
    for args in (["--version"], ["--help"]):
        done = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]


def test_a_command_imports_only_its_own_module():
    code = (
        "import sys; from eagle.cli import main; from eagle.cli_table import command_module_names; "
        "code = main(sys.argv[1:]); "
        "print([m for m in command_module_names() if m in sys.modules], 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "score", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "['eagle.cli_expert'] False"


def test_a_broken_command_module_fails_its_command_loudly(monkeypatch):
    from eagle import cli, cli_table

    rows = cli_table.COMMANDS
    broken = tuple(row._replace(module="eagle.no_such_module") if row.name == "score" else row for row in rows)
    monkeypatch.setattr(cli_table, "COMMANDS", broken)
    with pytest.raises(ModuleNotFoundError, match="eagle.no_such_module"):
        cli.main(["score", "--help"])


def test_asking_for_an_unknown_command_module_is_an_error():
    from eagle import cli

    with pytest.raises(ValueError, match="no.such"):
        cli.build_parser(["no.such"])
