"""``eagle bank``: manage the saved banks of the data directory from the command line.

Every subcommand goes through :class:`eagle.banks.BankStore`, the one implementation the app and the API use:
the same bank-name rule, the same zip checks and limits on import (:data:`eagle.banks.BANK_ZIP_LIMITS`), the
same validation and test inspection before an imported bank is put in place. Read commands (``list``,
``show``) take ``--json``. Errors are one line on stderr and exit code 2 (see :mod:`eagle.cli`).

Each subcommand is one ``_add_<name>(bank_subparsers)`` function registering one ``run_<name>`` handler;
:func:`register` lists them in help order.

Examples:
    $ eagle bank list --json
    $ eagle bank create line-7 --empty
    $ eagle bank inspect line-7 part.png --json
    $ eagle bank show widget
    $ eagle bank export widget --out widget.zip
    $ eagle bank import widget.zip --name widget-line4
    $ eagle bank delete widget-line4
    $ eagle bank add widget flagged-but-good.png
    $ eagle bank history widget --json
    $ eagle bank rollback widget 3
    $ eagle bank health widget --json
    $ eagle bank refresh widget --count 10
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eagle.errors import CommandError, is_disk_full
from eagle.settings import Settings

if TYPE_CHECKING:
    from eagle.banks import BankStore, BankSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bank`` and its subcommands to the ``eagle`` parser."""
    bank = subparsers.add_parser(
        "bank",
        help="List, declare (create --empty), inspect, show, export, import, delete, teach (add), history, "
        "rollback and line health of saved banks.",
        description="Manage the banks under <data_dir>/banks with the same checks as the app and the API.",
    )
    bank_subparsers = bank.add_subparsers(dest="bank_command", metavar="SUBCOMMAND")
    bank.set_defaults(func=_missing_subcommand(bank))
    for add in BANK_SUBCOMMANDS:
        add(bank_subparsers)


def _missing_subcommand(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace, Settings], int]:
    def handler(args: argparse.Namespace, settings: Settings) -> int:
        parser.print_help(sys.stderr)
        return 2

    return handler


# -- helpers -----------------------------------------------------------------------------------------------------
def open_store(settings: Settings) -> BankStore:
    """The bank store of the configured data directory (the one the app, the API and the watcher use)."""
    from eagle.pipeline import Pipeline

    return Pipeline(settings).banks


def summary_dict(summary: BankSummary, store: BankStore) -> dict[str, Any]:
    """A bank summary as JSON-ready data, with its directory."""
    data = summary.model_dump()
    data["build_warnings"] = list(summary.build_warnings)
    data["path"] = str(store.path(summary.name))
    return data


def _add_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="Bank name.")


# -- list --------------------------------------------------------------------------------------------------------
def _add_list(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser("list", help="List the saved banks, newest first.")
    parser.add_argument("--json", action="store_true", help="Print one JSON array of bank summaries.")
    parser.set_defaults(func=run_list)


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank list``: the saved banks, then the lines declared without a bank (``state`` ``declared``)."""
    store = open_store(settings)
    summaries = store.list()
    declared = store.declared()
    if args.json:
        lines = [{**line.model_dump(), "path": str(store.lines.folder(line.name))} for line in declared]
        print(json.dumps([*[{**summary_dict(s, store), "state": "built"} for s in summaries], *lines]))
        return 0
    print(f"{'bank':<24} {'refs':>5} {'coreset':>8} {'tau':>10} {'s_max':>10}  {'created (UTC)':<26} bank_id")
    for s in summaries:
        print(
            f"{s.name:<24} {s.n_references:>5} {s.coreset_size:>8} {s.tau:>10.5g} {s.s_max:>10.5g}  "
            f"{s.created[:26]:<26} {s.bank_id[:16]}"
        )
    for line in declared:
        print(
            f"{line.name:<24} {line.collected:>5} {'-':>8} {'-':>10} {'-':>10}  {line.declared[:26]:<26} "
            f"declared (empty): {_declared_words(line)}"
        )
    print(f"({len(summaries)} banks, {len(declared)} declared lines in {store.root})", file=sys.stderr)
    return 0


def _declared_words(line: Any) -> str:
    """What a declared line's row says: collected so far, and what an inspection does now."""
    inspection = "MLLM-only 0-shot inspection" if line.inspection == "mllm-only-0shot" else "inspection refused"
    ready = "; ready to build" if line.ready_to_build else ""
    return f"{line.collected}/{line.min_references} good parts collected, {inspection}{ready}"


# -- create --empty (declare a line before its bank) --------------------------------------------------------------
def _add_create(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "create",
        help="Declare a line before its bank exists (--empty).",
        description="Declare a line with no bank yet: inspections against it are asked of the MLLM alone, 0-shot "
        "(no template, no expert hints, no CAAS), labelled mllm-only-0shot; with the MLLM disabled they are "
        "refused (bank_empty). Parts an operator confirms good are collected as its first references; build the "
        "bank once enough are collected (the app offers it). Build a bank from images with eagle build-bank.",
    )
    _add_name(parser)
    parser.add_argument("--empty", action="store_true", required=True, help="Declare it without a bank (required).")
    parser.add_argument("--note", default="", help="One line for people (what the line makes).")
    parser.add_argument("--json", action="store_true", help="Print the declared line as one JSON object.")
    parser.set_defaults(func=run_create)


def run_create(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank create NAME --empty``."""
    store = open_store(settings)
    line = store.declare(args.name, note=args.note)
    if args.json:
        print(json.dumps(line.model_dump()))
    else:
        print(f"{line.name}: declared (empty), {_declared_words(line)}")
    print(f"eagle bank create: line {args.name!r} declared in {store.lines.root}", file=sys.stderr)
    return 0


# -- inspect (the one pipeline, as the app and the API inspect) -------------------------------------------------
def _add_inspect(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "inspect",
        help="Inspect images against a bank or a declared line (the pipeline of the app and the API; not audited).",
    )
    _add_name(parser)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="Image files to inspect.")
    parser.add_argument("--no-mllm", action="store_true", help="Expert only (a declared line then refuses).")
    parser.add_argument("--json", action="store_true", help="One JSON object (the inspection record) per line.")
    parser.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank inspect NAME IMAGE...``: :meth:`eagle.pipeline.Pipeline.inspect` per image.

    An unknown name, a declared line with the MLLM disabled (``bank_empty``) or an unusable bank stop it with one
    line; an unreadable image is reported and the others are inspected (exit 1 when any failed).
    """
    from eagle.images import ImageError
    from eagle.pipeline import Pipeline
    from eagle.records import InspectOptions

    pipeline = Pipeline(settings)
    if not pipeline.banks.exists(args.name) and not pipeline.banks.is_declared(args.name):
        pipeline.banks.load(args.name)  # the one bank_not_found message
    options = InspectOptions(use_mllm=not args.no_mllm)
    failed = 0
    for path in args.images:
        try:
            result = pipeline.inspect(path, args.name, options, image_name=path.name)
        except ImageError as err:
            failed += 1
            print(f"eagle bank inspect: error: {err}", file=sys.stderr)
            continue
        if args.json:
            print(result.model_dump_json())
        else:
            print(_inspection_line(result))
    return 1 if failed else 0


def _inspection_line(result: Any) -> str:
    """One line per inspection: image, verdict, and who decided (with the expert's score when it ran)."""
    if result.score is None:
        decided = f"{result.mode} (MLLM alone: no bank, no template, no expert hints, no CAAS)"
    else:
        decided = f"{result.mode}, score {result.score:.4g} vs τ {result.tau:.4g}"
    return f"{result.image_name or result.image_sha256[:16]}: {result.verdict} — {decided}"


# -- show --------------------------------------------------------------------------------------------------------
def _add_show(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser("show", help="Show one bank: references, threshold, backbone, warnings.")
    _add_name(parser)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.set_defaults(func=run_show)


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank show NAME``."""
    from expert.bank import read_meta

    store = open_store(settings)
    summary = store.summary(args.name)
    meta = read_meta(store.path(args.name))
    data = summary_dict(summary, store)
    data["references"] = [ref.name for ref in meta.references]
    if args.json:
        print(json.dumps(data))
        return 0
    width = max(len(key) for key in data)
    for key, value in data.items():
        if key == "references":
            value = (
                f"{len(value)}: " + ", ".join(value[:5]) + (f", … ({len(value) - 5} more)" if len(value) > 5 else "")
            )
        elif isinstance(value, list):
            value = "; ".join(value) or "-"
        print(f"{key:<{width}}  {'-' if value is None else value}")
    return 0


# -- export ------------------------------------------------------------------------------------------------------
def _add_export(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser("export", help="Write a bank as a zip (to copy it to another box).")
    _add_name(parser)
    parser.add_argument("--out", type=Path, default=None, help="Zip file to write (default: ./NAME.zip).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing zip file.")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank export NAME [--out FILE]``."""
    store = open_store(settings)
    dest = (args.out or Path(f"{args.name}.zip")).expanduser()
    store.summary(args.name)  # name rule and existence first: nothing is written for a bad name
    if dest.exists() and not args.overwrite:
        raise CommandError(f"{str(dest)!r} exists; pass --overwrite to replace it")
    if dest.is_dir():
        raise CommandError(f"{str(dest)!r} is a directory; give a zip file name")
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        store.export_zip(args.name, partial)
        partial.replace(dest)
    except OSError as err:
        partial.unlink(missing_ok=True)
        if is_disk_full(err):
            raise  # one line and exit 3 (eagle.cli.main)
        raise CommandError(f"cannot write {str(dest)!r}: {err.strerror or err}") from None
    print(f"eagle bank export: {args.name!r} written to {dest}", file=sys.stderr)
    return 0


# -- import ------------------------------------------------------------------------------------------------------
def _add_import(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "import",
        help="Import a bank zip (checked, validated and test-inspected before it is put in place).",
    )
    parser.add_argument("zip", type=Path, metavar="ZIP", help="Bank zip (from `eagle bank export` or the app).")
    parser.add_argument("--name", default=None, help="Name of the imported bank (default: the zip's file name).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing bank of that name.")
    parser.add_argument("--json", action="store_true", help="Print the imported bank's summary as JSON.")
    parser.set_defaults(func=run_import)


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank import ZIP [--name NAME]``."""
    from eagle.banks import validate_bank_name

    zip_path: Path = args.zip.expanduser()
    name = args.name or zip_path.stem
    store = open_store(settings)
    validate_bank_name(name)
    if not zip_path.is_file():
        raise CommandError(f"no such zip file: {str(zip_path)!r}")
    if store.exists(name) and not args.overwrite:
        raise CommandError(f"a bank named {name!r} exists; pass --overwrite to replace it, or choose --name")
    summary = store.import_zip(zip_path, name)
    if args.json:
        print(json.dumps(summary_dict(summary, store)))
    print(
        f"eagle bank import: {summary.name!r} imported ({summary.n_references} references, tau {summary.tau:.5g}, "
        f"bank_id {summary.bank_id[:16]})",
        file=sys.stderr,
    )
    return 0


# -- delete ------------------------------------------------------------------------------------------------------
def _add_delete(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser("delete", help="Delete a saved bank (or a declared line).")
    _add_name(parser)
    parser.set_defaults(func=run_delete)


def run_delete(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank delete NAME``."""
    store = open_store(settings)
    store.delete(args.name)
    print(f"eagle bank delete: {args.name!r} deleted", file=sys.stderr)
    return 0


# -- add (teach: "these are normal") -------------------------------------------------------------------------
def _add_add(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "add",
        help="Teach a bank that images are normal: rebuild it with them as a new version (old tau -> new tau).",
        description="Add images of GOOD parts (files or folders) to a bank's references and rebuild it from its "
        "stored references plus these, with the bank's own settings and seed, as a new version. Prints tau and "
        "s_max before and after and whether each added image passes the new bank. Undo: `eagle bank rollback`.",
    )
    _add_name(parser)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="Image files or folders of them.")
    parser.add_argument("--json", action="store_true", help="Print the change as one JSON object.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")
    parser.set_defaults(func=run_add)


def run_add(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank add NAME IMAGE...``."""
    from eagle.bank_service import BUILD_STAGES
    from eagle.images import list_images
    from eagle.pipeline import Pipeline
    from eagle.progress_bars import StageBar

    paths: list[Path] = []
    for item in args.images:
        item = item.expanduser()
        if item.is_dir():
            paths.extend(list_images(item))
        elif item.is_file():
            paths.append(item)
        else:
            raise CommandError(f"no such image file or folder: {str(item)!r}")
    if not paths:
        raise CommandError("no images found to add")
    pipeline = Pipeline(settings)
    bar = StageBar(BUILD_STAGES, desc=f"bank {args.name}", enabled=not args.no_progress)
    with bar:
        result = pipeline.add_references(paths, args.name, progress=bar)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.describe())
    return 0


# -- history -----------------------------------------------------------------------------------------------------
def _add_history(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "history", help="List a bank's kept versions: tau, s_max, reference count, date, what made each."
    )
    _add_name(parser)
    parser.add_argument("--json", action="store_true", help="Print one JSON array of versions, oldest first.")
    parser.set_defaults(func=run_history)


def run_history(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank history NAME``."""
    store = open_store(settings)
    versions = store.history(args.name)
    if args.json:
        print(json.dumps([v.model_dump() for v in versions]))
        return 0
    print(f"  {'version':>7} {'refs':>5} {'tau':>10} {'s_max':>10}  {'created (UTC)':<26} {'action':<10} note")
    for v in versions:
        mark = "*" if v.current else " "
        print(
            f"{mark} {v.version:>7} {v.n_references:>5} {v.tau:>10.5g} {v.s_max:>10.5g}  {v.created[:26]:<26} "
            f"{v.action:<10} {v.note}"
        )
    print("(* = current; `eagle bank rollback NAME VERSION` makes another one current)", file=sys.stderr)
    return 0


# -- rollback ----------------------------------------------------------------------------------------------------
def _add_rollback(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "rollback",
        help="Make a kept version of a bank current again (the pointer moves; nothing is deleted).",
    )
    _add_name(parser)
    parser.add_argument("version", type=int, metavar="VERSION", help="Version number (see `eagle bank history`).")
    parser.set_defaults(func=run_rollback)


def run_rollback(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank rollback NAME VERSION``."""
    store = open_store(settings)
    summary = store.rollback(args.name, args.version)
    print(
        f"eagle bank rollback: {args.name!r} is at version {args.version} ({summary.n_references} references, "
        f"tau {summary.tau:.5g}, bank_id {summary.bank_id[:16]})",
        file=sys.stderr,
    )
    return 0


# -- health ------------------------------------------------------------------------------------------------------
def _add_health(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "health",
        help="Line health: have the bank's recent scores of good parts drifted from its own? (ok, watch, drifting)",
        description="Compare the scores of the bank's latest audited inspections (service, watched folder, app; "
        "parts an operator marked defective left out) with its DBT training scores: median shift in training "
        "spreads, share above tau against the bank's own rate, Kolmogorov-Smirnov D. Windows and limits: "
        "EAGLE_HEALTH__*. Exit code 0 whatever the state (read it from the output or --json).",
    )
    _add_name(parser)
    parser.add_argument(
        "--json", action="store_true", help="Print one JSON object (every statistic, the scores compared)."
    )
    parser.set_defaults(func=run_health)


def run_health(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank health NAME``."""
    from eagle.audit import AuditLog, default_audit_path
    from eagle.line_health import describe_health
    from eagle.pipeline import Pipeline

    pipeline = Pipeline(settings)
    with AuditLog(default_audit_path(settings)) as audit:
        health = pipeline.line_health(args.name, audit)
    print(health.model_dump_json() if args.json else describe_health(health))
    return 0


# -- refresh -----------------------------------------------------------------------------------------------------
def _add_refresh(bank_subparsers: argparse._SubParsersAction) -> None:
    parser = bank_subparsers.add_parser(
        "refresh",
        help="Grow a bank from confirmed good parts: propose recent kept inspections, teach them on approval.",
        description="Propose the most recent inspections of the bank's current version that the expert passed with "
        "margin (score <= EAGLE_KEEP_IMAGES__REFRESH_MARGIN x tau) or an operator confirmed good, whose image is "
        "kept (EAGLE_KEEP_IMAGES__ENABLED=true), then teach them as a new version after confirmation. "
        "Undo: `eagle bank rollback`.",
    )
    _add_name(parser)
    parser.add_argument("--count", type=int, default=None, metavar="N", help="Most images proposed.")
    parser.add_argument("--yes", action="store_true", help="Teach the proposal without asking.")
    parser.add_argument(
        "--auto",
        action="store_true",
        help="Unattended (cron): teach without asking, allowed only with EAGLE_KEEP_IMAGES__AUTO_REFRESH=true.",
    )
    parser.add_argument("--dry-run", action="store_true", help="Only show the proposal.")
    parser.add_argument("--json", action="store_true", help="Print the proposal (and the teach result) as JSON.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")
    parser.set_defaults(func=run_refresh)


def run_refresh(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle bank refresh NAME``."""
    from eagle.audit import AuditLog, default_audit_path
    from eagle.bank_refresh import apply, describe_proposal, propose_for
    from eagle.bank_service import BUILD_STAGES
    from eagle.kept_images import KeptImages
    from eagle.pipeline import Pipeline
    from eagle.progress_bars import StageBar

    if args.count is not None and not 1 <= args.count <= 64:
        raise CommandError("--count must be between 1 and 64")
    if args.auto and not settings.keep_images.auto_refresh:
        raise CommandError("--auto needs EAGLE_KEEP_IMAGES__AUTO_REFRESH=true (otherwise approve with --yes)")
    pipeline = Pipeline(settings)
    kept = KeptImages.of(settings)
    with AuditLog(default_audit_path(settings)) as audit:
        proposal = propose_for(pipeline, settings, args.name, audit, kept, count=args.count)
    if not args.json:
        print(describe_proposal(proposal))
    if not proposal.candidates or args.dry_run:
        if args.json:
            print(json.dumps({"proposal": proposal.model_dump(), "taught": None}))
        return 0
    if not (args.yes or args.auto):
        if not sys.stdin.isatty():
            raise CommandError("not a terminal: approve with --yes (or show only with --dry-run)")
        answer = input(f"Teach these {len(proposal.candidates)} image(s) to {args.name!r} as a new version? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("eagle bank refresh: nothing taught", file=sys.stderr)
            return 1
    bar = StageBar(BUILD_STAGES, desc=f"bank {args.name}", enabled=not args.no_progress)
    with bar:
        result = apply(
            pipeline,
            args.name,
            proposal.candidates,
            kept,
            data_dir=settings.data_dir,
            approved_by="auto" if args.auto else "cli",
            progress=bar,
        )
    if args.json:
        print(json.dumps({"proposal": proposal.model_dump(), "taught": result.to_dict()}))
    else:
        print(result.describe())
        print(
            f"bank {args.name!r} is at version {result.version} (undo: eagle bank rollback {args.name} "
            f"{result.version_before})"
            if result.version_before
            else f"bank {args.name!r} is at version {result.version}"
        )
    return 0


BANK_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_list,
    _add_create,
    _add_inspect,
    _add_show,
    _add_export,
    _add_import,
    _add_delete,
    _add_add,
    _add_history,
    _add_rollback,
    _add_health,
    _add_refresh,
]
"""The ``eagle bank`` subcommands in help order: each adds its parser and sets its handler."""
