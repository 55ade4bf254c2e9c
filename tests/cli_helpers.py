"""Running ``eagle`` subcommands in-process, as the CLI tests do."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import pytest

from eagle import cli
from tests.synthetic import make_mvtec_like


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``eagle ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def eagle_env(tmp_path_factory, home_name: str, log_level: str = "WARNING") -> Iterator[dict[str, str]]:
    """Set the ``EAGLE_*`` environment of a CLI test module (random weights, a fresh data dir); yields it.

    Use from a module-scoped fixture: ``yield from eagle_env(tmp_path_factory, "eagle-home")``.
    """
    home = tmp_path_factory.mktemp(home_name)
    values = {"EAGLE_EXPERT__WEIGHTS": "random", "EAGLE_DATA_DIR": str(home), "EAGLE_LOG_LEVEL": log_level}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        yield values


def small_dataset(tmp_path_factory, name: str):
    """A small MVTec-like data set (4 train images, 1 good and 1 bad test image per defect type)."""
    return make_mvtec_like(tmp_path_factory.mktemp(name), n_train=4, n_test_good=1, n_test_bad_per_type=1)
