"""The ``eagle`` command line: one entry point, subcommands contributed by several packages.

Each subcommand module is imported explicitly in :func:`command_modules` and exposes
``register(subparsers)``, which adds its subcommands with ``parser.set_defaults(func=handler)``; a handler is
``handler(args, settings) -> int`` (the exit code). A module that fails to import fails ``eagle`` loudly (a
traceback naming it) instead of silently vanishing from ``eagle --help``. The command modules are light: heavy
dependencies (gradio, uvicorn, torch) are imported by the handlers, when a command runs.

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
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from eagle import __version__
from eagle.errors import disk_full_error, is_disk_full
from eagle.settings import Settings, SettingsError, load_settings

Handler = Callable[[argparse.Namespace, Settings], int]

log = logging.getLogger("eagle.cli")

EXIT_DISK_FULL = 3
"""Exit code of a command stopped by a full disk or quota (:class:`eagle.errors.DiskFullError`)."""


class CommandError(Exception):
    """A failure a handler reports as one line on stderr (no traceback) with its exit code.

    Example:
        >>> raise CommandError("bank not found: ./banks/widget", exit_code=2)
        Traceback (most recent call last):
        ...
        eagle.cli.CommandError: bank not found: ./banks/widget
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class CommandRegistry:
    """The ``eagle`` argument parser with every subcommand registered."""

    parser: argparse.ArgumentParser


def command_modules() -> list[ModuleType]:
    """The modules contributing subcommands, in help order: imported explicitly, so a broken one fails loudly.

    The imports live in this function (not at the top of the module) because the command modules import
    :class:`CommandError` from here. A new command module is added here and nowhere else.

    Example:
        >>> [m.__name__ for m in command_modules()]
        ['eagle.cli_expert', 'eagle.cli_bank', 'deploy.cli', 'eagle.evaluation.cli', 'app.cli', 'eagle.cli_doctor']
    """
    import app.cli
    import deploy.cli
    import eagle.cli_bank
    import eagle.cli_doctor
    import eagle.cli_expert
    import eagle.evaluation.cli

    return [eagle.cli_expert, eagle.cli_bank, deploy.cli, eagle.evaluation.cli, app.cli, eagle.cli_doctor]


def build_parser(modules: Sequence[str] | None = None) -> CommandRegistry:
    """Build the ``eagle`` parser from the subcommand modules.

    Args:
        modules: names of the command modules to register (default: all of :func:`command_modules`).

    Returns:
        The registry holding the parser.

    Raises:
        ValueError: a name in ``modules`` is not a command module.
    """
    parser = argparse.ArgumentParser(
        prog="eagle",
        description="EAGLE: tuning-free industrial visual inspection (PatchCore expert + multimodal LLM).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=None,
        help="Logging level (default: EAGLE_LOG_LEVEL, else INFO).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {module.__name__: module for module in command_modules()}
    names = list(available) if modules is None else list(modules)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"not command modules: {', '.join(unknown)} (known: {', '.join(available)})")
    for name in names:
        available[name].register(subparsers)
    return CommandRegistry(parser)


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
    parser = build_parser().parser
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse prints its own one-line usage error
        return int(exit_.code or 0)
    handler: Handler | None = getattr(args, "func", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"eagle: {err}", file=sys.stderr)
        return 2
    _configure_logging(args.log_level or settings.log_level)
    try:
        return int(handler(args, settings))
    except CommandError as err:
        print(f"eagle {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except SettingsError as err:
        print(f"eagle {args.command}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_disk_full(err):
            raise  # a bug: the traceback is wanted
        print(f"eagle {args.command}: error: {disk_full_error(err)}", file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print("eagle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
