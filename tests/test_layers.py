"""The layers of docs/architecture.md hold: import-linter's contracts in pyproject.toml, run as a test.

app/  deploy/      front ends
   eagle/          composition root
expert/  mllm/     libraries: never import upward or sideways; each owns its configuration
   common/         helpers every layer uses (atomic writes, the progress protocol): imports none of the above
"""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports() -> str:
    found = Path(sys.executable).parent / "lint-imports"
    if found.is_file():
        return str(found)
    on_path = shutil.which("lint-imports")
    if on_path is None:
        pytest.fail("lint-imports not found: pip install -r requirements-dev.txt (import-linter)")
    return on_path


def test_the_import_contracts_are_kept():
    done = subprocess.run(
        [_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions, ``if TYPE_CHECKING:``), doctests excluded."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["expert", "mllm", "common"])
def test_libraries_import_nothing_from_the_layers_above(package):
    above = {"eagle", "app", "deploy", "expert", "mllm"} - {package}
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imported_modules(path)
        if name.split(".")[0] in above
    }
    assert not offenders, "\n".join(sorted(offenders))


@pytest.mark.parametrize(("package", "module"), [("expert", "expert.config"), ("mllm", "mllm.config")])
def test_each_library_owns_its_configuration(package, module):
    """The settings models live in the package; eagle.settings composes (and re-exports) them."""
    from eagle import settings

    config = importlib.import_module(module)
    for name in ("ExpertSettings",) if package == "expert" else ("MLLMSettings", "CAASSettings", "PromptSettings"):
        model = getattr(config, name)
        assert model.__module__ == module
        assert getattr(settings, name) is model
