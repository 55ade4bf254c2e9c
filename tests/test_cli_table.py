"""The static command table (eagle/cli_table.py) against what every command module really registers.

``eagle --help`` is built from the table without importing the modules, so these tests import each one (a
broken module fails here, loudly) and check that the names and help lines cannot drift apart.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import pytest

from eagle import cli, cli_table
from tests.cli_helpers import run_cli


class RecordingSubparsers:
    """Stands in for argparse's subparsers action and notes each ``add_parser(name, help=...)`` call."""

    def __init__(self) -> None:
        self._real = argparse.ArgumentParser(prog="eagle").add_subparsers()
        self.added: list[tuple[str, str | None]] = []

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        self.added.append((name, kwargs.get("help")))
        return self._real.add_parser(name, **kwargs)


def registered(module_name: str) -> list[tuple[str, str | None]]:
    """(name, help) of every subcommand that ``module_name.register`` adds, in order."""
    recorder = RecordingSubparsers()
    importlib.import_module(module_name).register(recorder)
    return recorder.added


@pytest.mark.parametrize("module_name", cli_table.command_module_names())
def test_each_module_registers_exactly_its_table_rows(module_name):
    table = [(row.name, row.help) for row in cli_table.COMMANDS if row.module == module_name]
    assert registered(module_name) == table


def test_the_table_has_unique_names_and_one_line_help():
    names = [row.name for row in cli_table.COMMANDS]
    assert len(names) == len(set(names)) == 11
    assert all(row.help and "\n" not in row.help and row.help.endswith(".") for row in cli_table.COMMANDS)


def test_the_full_parser_and_the_listed_one_offer_the_same_commands():
    def choices(parser: argparse.ArgumentParser) -> list[str]:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return list(action.choices)

    full = cli.build_parser().parser
    listed = cli.build_parser([]).parser
    assert choices(full) == choices(listed) == [row.name for row in cli_table.COMMANDS]
    assert full.format_help() == listed.format_help()  # the real help lines are the table's


def test_a_listed_command_gets_its_real_parser_when_named():
    parser = cli.build_parser(["deploy.cli"]).parser
    args = parser.parse_args(["watch", "--in", "a", "--out", "b", "--bank", "widget", "--once"])
    assert args.func.__name__ == "run_watch" and args.once
    with pytest.raises(SystemExit):  # the placeholders of the other modules' commands take no options
        parser.parse_args(["app", "--port", "80"])


def test_a_module_missing_a_table_row_is_refused(monkeypatch):
    extra = cli_table.Command("ghost", "A command nobody registers.", "app.cli")
    monkeypatch.setattr(cli_table, "COMMANDS", (*cli_table.COMMANDS, extra))
    with pytest.raises(RuntimeError, match="app.cli does not register ghost"):
        cli.build_parser(["app.cli"])


def test_command_lookup():
    assert cli_table.command("audit").module == "eagle.cli_audit"
    with pytest.raises(KeyError):
        cli_table.command("nope")


def test_usage_errors_keep_their_exit_code_and_name_every_command():
    code, _, err = run_cli(["no-such-command"])
    assert code == 2 and "invalid choice: 'no-such-command'" in err
    assert all(f"'{row.name}'" in err for row in cli_table.COMMANDS)
    code, _, err = run_cli(["score"])  # the real parser: its required options
    assert code == 2 and "--bank" in err
