"""The ``eagle`` command line: one entry point, subcommands contributed by several packages.

Each subcommand module listed in :data:`COMMAND_MODULES` exposes ``register(subparsers)``, which adds
its subcommands with ``parser.set_defaults(func=handler)``; a handler is ``handler(args, settings) -> int``
(the exit code). A module that cannot be imported (an optional extra that is not installed) removes only
its own commands: the others keep working, and asking for a missing one says why it is missing.

Exit codes: 0 success; 1 some inputs failed (each named on stderr); 2 usage, configuration or bank errors;
130 interrupted.

Example:
    $ eagle build-bank --normals ./good --name widget
    $ eagle score --bank ~/.local/share/eagle/banks/widget part1.png part2.jpg --json
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from eagle import __version__
from eagle.settings import Settings, SettingsError, load_settings

#: Modules contributing subcommands, in help order. Packages add their module name here.
COMMAND_MODULES: list[str] = [
    "eagle.cli_expert",
    "deploy.cli",
    "eagle.evaluation.cli",
    "app.cli",
]

Handler = Callable[[argparse.Namespace, Settings], int]

log = logging.getLogger("eagle.cli")


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
    """The argument parser plus what went wrong while collecting subcommands."""

    parser: argparse.ArgumentParser
    unavailable: dict[str, str] = field(default_factory=dict)  # module name -> one-line reason


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def build_parser(modules: Sequence[str] | None = None) -> CommandRegistry:
    """Build the ``eagle`` parser from the subcommand modules.

    Args:
        modules: module names to import (default :data:`COMMAND_MODULES`).

    Returns:
        The registry: the parser and the modules that could not be loaded, with the reason.
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
    registry = CommandRegistry(parser)
    for name in COMMAND_MODULES if modules is None else modules:
        try:
            module = importlib.import_module(name)
            module.register(subparsers)
        except Exception as err:  # noqa: BLE001 - an optional module must not break the other commands
            registry.unavailable[name] = _one_line(err)
            log.debug("subcommand module %s unavailable: %s", name, registry.unavailable[name])
    if registry.unavailable:
        parser.epilog = "Unavailable command modules: " + "; ".join(
            f"{name} ({reason})" for name, reason in registry.unavailable.items()
        )
    return registry


def _known_commands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def _first_positional(argv: Sequence[str]) -> str | None:
    skip_next = False
    for token in argv:
        if skip_next:
            skip_next = False
        elif token == "--log-level":
            skip_next = True
        elif not token.startswith("-"):
            return token
    return None


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
    registry = build_parser()
    parser = registry.parser
    command = _first_positional(argv)
    if command is not None and registry.unavailable and command not in _known_commands(parser):
        reasons = "; ".join(f"{name}: {reason}" for name, reason in registry.unavailable.items())
        print(f"eagle: unknown or unavailable command {command!r} (modules not loaded: {reasons})", file=sys.stderr)
        return 2
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
    except KeyboardInterrupt:
        print("eagle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
