"""Every benchmark script starts (``--help``) and none shadows a project package when ``bench/`` is on sys.path.

``python bench/<script>.py`` puts ``bench/`` first on ``sys.path``; a script named like a project package
(``bench/expert.py``) then made ``import expert`` import the script itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PROJECT_PACKAGES = ("eagle", "expert", "mllm", "app", "deploy", "common")
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_there_are_bench_scripts():
    assert any(p.name == "bench_expert.py" for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_bench_script_shadows_a_project_package(script: Path):
    assert script.stem not in PROJECT_PACKAGES, f"bench/{script.name} shadows the {script.stem!r} package"
    assert not (BENCH / script.stem).is_dir()


def test_project_packages_import_with_bench_first_on_sys_path():
    code = (
        "import sys; sys.path[0:0] = ['bench']; import expert.coreset, mllm.answers, eagle.settings; "
        "import expert, mllm, eagle; "
        "assert all('bench' not in m.__file__.split('/')[-3:-1] for m in (expert, mllm, eagle)), "
        "[m.__file__ for m in (expert, mllm, eagle)]"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_help_exits_zero(script: Path):
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{script.name} --help failed:\n{done.stderr[-2000:]}"
