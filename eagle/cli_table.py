"""The static table of ``eagle`` subcommands: name, one-line help and the module that implements each.

``eagle --help`` is built from this table alone, so listing the commands imports none of them; ``eagle NAME``
imports only NAME's module, which registers its real parser. The table imports nothing, so it stays cheap.

A new command is one row here plus a ``register(subparsers)`` in its module that adds a parser of the same
name and the same ``help``; ``tests/test_cli_table.py`` imports every module listed and fails when the two
differ.

Example:
    >>> command("score").module
    'eagle.cli_expert'
    >>> [c.name for c in COMMANDS if c.module == "eagle.evaluation.cli"]
    ['eval', 'eval-merge']
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    """One ``eagle`` subcommand as listed by ``eagle --help``."""

    name: str
    """The subcommand's name (``eagle NAME``)."""
    help: str
    """Its one-line help: exactly the ``help=`` its module's ``register`` passes to ``add_parser``."""
    module: str
    """The module whose ``register(subparsers)`` adds its parser (imported only when NAME runs)."""


#: Every subcommand, in ``eagle --help`` order.
COMMANDS: tuple[Command, ...] = (
    Command(
        "build-bank",
        "Build an expert bank from a folder of normal (defect-free) reference images.",
        "eagle.cli_expert",
    ),
    Command("score", "Score images against a bank (expert only).", "eagle.cli_expert"),
    Command(
        "warm-cache",
        "Export the expert's ONNX backbone into the cache now, so bank builds skip the 10-20 s export.",
        "eagle.cli_expert",
    ),
    Command(
        "bank",
        "List, declare (create --empty), inspect, show, export, import, delete, teach (add), history, "
        "rollback and line health of saved banks.",
        "eagle.cli_bank",
    ),
    Command("serve", "Run the headless HTTP inspection service (REST API, metrics).", "deploy.cli"),
    Command("watch", "Inspect every image dropped into a folder (exactly once, crash-safe).", "deploy.cli"),
    Command("audit", "Show or export the inspection audit log.", "eagle.cli_audit"),
    Command(
        "eval",
        "Evaluate on MVTec-AD / VisA / MMAD / a good+bad folder and write the paper's tables.",
        "eagle.evaluation.cli",
    ),
    Command(
        "eval-merge",
        "Combine the records of several eval output folders (shards) into one report.",
        "eagle.evaluation.cli",
    ),
    Command("app", "Serve the web app (Gradio).", "app.cli"),
    Command(
        "doctor",
        "Check what this installation can do (weights, GPU, bitsandbytes, hub, disk) and how to fix it.",
        "eagle.cli_doctor",
    ),
)


def command(name: str) -> Command:
    """The table row of subcommand ``name``.

    Raises:
        KeyError: ``name`` is not an ``eagle`` subcommand.
    """
    for row in COMMANDS:
        if row.name == name:
            return row
    raise KeyError(name)


def command_module_names() -> list[str]:
    """The modules that implement the subcommands, each once, in help order."""
    return list(dict.fromkeys(row.module for row in COMMANDS))
