"""The ``eagle`` command line: one entry point, subcommands contributed by several packages.

The subcommands are listed in a static table, :data:`eagle.cli_table.COMMANDS` (name, one-line help, module), so
``eagle --help`` and ``eagle --version`` import no command module. ``eagle NAME ...`` imports only NAME's module,
whose ``register(subparsers)`` adds its subcommands with ``parser.set_defaults(func=handler)``; a handler is
``handler(args, settings) -> int`` (the exit code). A module that fails to import fails its command loudly (a
traceback naming it); ``tests/test_cli_table.py`` imports every module of the table and checks that each registers
exactly the names and help the table lists. Heavy dependencies (gradio, uvicorn, torch) are imported by the
handlers, when a command runs.

Errors: a handler raises; :func:`main` shows every known failure (an :class:`eagle.errors.EagleError`, or a library
error :func:`eagle.errors.as_eagle_error` maps) as one line on stderr and exits with its exit code. Anything else
is a bug and keeps its traceback.

Exit codes: 0 success; 1 some inputs failed (each named on stderr); 2 usage, configuration or bank errors;
3 the disk (or quota) is full (nothing half-written stays; free space and rerun); 4 ``eagle doctor``: something the
configured setup needs is missing (the table says what and how to fix it); 130 interrupted.

Example:
    $ eagle build-bank --normals ./good --name widget
    $ eagle score --bank ~/.local/share/eagle/banks/widget part1.png part2.jpg --json
    $ eagle bank list --json
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Literal, get_args

from eagle import __version__, cli_table

if TYPE_CHECKING:  # settings (pydantic) load after parsing, so --version and --help stay fast
    from eagle.settings import Settings

Handler = Callable[[argparse.Namespace, "Settings"], int]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
"""The logging levels ``--log-level`` and ``EAGLE_LOG_LEVEL`` accept (defined here: this module stays cheap)."""
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)

log = logging.getLogger("eagle.cli")


@dataclass
class CommandRegistry:
    """The ``eagle`` argument parser with every subcommand registered."""

    parser: argparse.ArgumentParser


def command_modules() -> list[ModuleType]:
    """Import every command module of :data:`~eagle.cli_table.COMMANDS`, in help order (an import error propagates).

    ``eagle`` itself imports one module per run (:func:`main`); this is for a parser with every command
    registered (:func:`build_parser` with no arguments) and for the tests.

    Example:
        >>> names = [m.__name__ for m in command_modules()]
        >>> names[:4]
        ['eagle.cli_expert', 'eagle.cli_bank', 'deploy.cli', 'eagle.cli_audit']
        >>> names[4:]
        ['eagle.evaluation.cli', 'app.cli', 'eagle.cli_doctor']
    """
    return [importlib.import_module(name) for name in cli_table.command_module_names()]


def build_parser(modules: Sequence[str] | None = None) -> CommandRegistry:
    """Build the ``eagle`` parser: the given command modules register their parsers, the rest are listed only.

    Every command of :data:`~eagle.cli_table.COMMANDS` appears in ``--help``; those of ``modules`` get their real
    parser (imported and registered), the others a placeholder that only carries the table's help line.

    Args:
        modules: names of the command modules to import and register (default: all of them; ``[]``: none).

    Returns:
        The registry holding the parser.

    Raises:
        ValueError: a name in ``modules`` is not a command module of the table.
        RuntimeError: a module does not register a command the table assigns to it.
    """
    known = cli_table.command_module_names()
    names = known if modules is None else list(modules)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"not command modules: {', '.join(unknown)} (known: {', '.join(known)})")
    parser = argparse.ArgumentParser(
        prog="eagle",
        description="EAGLE: tuning-free industrial visual inspection (PatchCore expert + multimodal LLM).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        choices=list(LOG_LEVELS),
        default=None,
        help="Logging level (default: EAGLE_LOG_LEVEL, else INFO).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in names:
        importlib.import_module(name).register(subparsers)
        missing = [row.name for row in cli_table.COMMANDS if row.module == name and row.name not in subparsers.choices]
        if missing:
            raise RuntimeError(f"{name} does not register {', '.join(missing)} (see eagle/cli_table.py)")
    for row in cli_table.COMMANDS:
        if row.name not in subparsers.choices:  # listed, not imported: a placeholder that swallows its arguments
            subparsers.add_parser(row.name, help=row.help, add_help=False)
    return CommandRegistry(parser)


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, importing only the module of the command it names (argparse's SystemExit propagates)."""
    listed_only = build_parser([]).parser  # --version, --help and a bad command name end here
    command, _ = listed_only.parse_known_args(argv)
    if command.command is None:
        return command
    module = next(row.module for row in cli_table.COMMANDS if row.name == command.command)
    return build_parser([module]).parser.parse_args(argv)


#: Third-party loggers that narrate routine work at INFO (ONNX export passes, faiss's loader).
NOISY_LOGGERS: tuple[str, ...] = ("onnx_ir", "onnxscript", "torch.onnx", "faiss.loader", "httpx")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if level != "DEBUG":
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eagle`` command line and return its exit code.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit code (see the module docstring).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
    except SystemExit as exit_:  # argparse prints its own one-line usage error
        return int(exit_.code or 0)
    handler: Handler | None = getattr(args, "func", None)
    if handler is None:
        build_parser([]).parser.print_help(sys.stderr)
        return 2
    from eagle.errors import as_eagle_error, one_line
    from eagle.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"eagle: {err}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level or settings.log_level)
    try:
        return int(handler(args, settings))
    except SettingsError as err:
        print(f"eagle {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        known = as_eagle_error(err)
        if known is None:
            raise  # a bug: the traceback is wanted
        print(f"eagle {args.command}: error: {one_line(known)}", file=sys.stderr)
        return known.exit_code
    except KeyboardInterrupt:
        print("eagle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
