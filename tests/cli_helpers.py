"""Running ``eagle`` subcommands in-process, as the CLI tests do."""

from __future__ import annotations

import contextlib
import io

from eagle import cli


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``eagle ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()
