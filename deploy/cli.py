"""``eagle serve`` and ``eagle watch``: the edge box from the command line (``eagle audit``: :mod:`eagle.cli_audit`).

Examples:
    $ EAGLE_SERVICE__TOKEN=$(cat /run/secrets/eagle_token) eagle serve --host 0.0.0.0 --no-mllm
    $ eagle watch --in /line3/incoming --out /line3/results --bank bolts
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from eagle.errors import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``watch`` to the ``eagle`` parser."""
    serve = subparsers.add_parser(
        "serve",
        help="Run the headless HTTP inspection service (REST API, metrics).",
        description="Serve the REST API. A token (EAGLE_SERVICE__TOKEN or --token-file) is required on any "
        "address other than loopback. SIGTERM finishes accepted work before exiting.",
    )
    serve.add_argument("--host", default=None, help="Listen address (default EAGLE_SERVICE__HOST, 127.0.0.1).")
    serve.add_argument("--port", type=int, default=None, help="Port (default EAGLE_SERVICE__PORT, 8080).")
    serve.add_argument("--token-file", type=Path, default=None, help="Read the bearer token from this file.")
    serve.add_argument("--no-mllm", action="store_true", help="Expert-only mode: never load the MLLM.")
    serve.add_argument("--queue-size", type=int, default=None, help="Inspections allowed to wait (then 429).")
    serve.set_defaults(func=run_serve)

    watch = subparsers.add_parser(
        "watch",
        help="Inspect every image dropped into a folder (exactly once, crash-safe).",
        description="Watch --in for new images; write <name>.json and <name>.annotated.png to --out; move each "
        "input to --in/done or --in/failed (never deleted). Resumes after a crash from --in/processing.",
    )
    watch.add_argument("--in", dest="in_dir", required=True, type=Path, help="Folder to watch.")
    watch.add_argument("--out", dest="out_dir", required=True, type=Path, help="Folder for results.")
    watch.add_argument("--bank", required=True, help="Bank name to inspect against.")
    watch.add_argument("--poll", type=float, default=None, help="Seconds between scans (EAGLE_SERVICE__WATCH_POLL_S).")
    watch.add_argument("--once", action="store_true", help="Process what is there (and recover), then exit.")
    watch.add_argument("--no-mllm", action="store_true", help="Expert-only mode: never load the MLLM.")
    watch.set_defaults(func=run_watch)


def _apply(group: Any, **values: Any) -> None:
    """Assign validated overrides onto a settings group; a bad value is one line naming the option."""
    for key, value in values.items():
        if value is None:
            continue
        try:
            setattr(group, key, value)
        except ValidationError as err:
            raise CommandError(f"--{key.replace('_', '-')}: {err.errors()[0]['msg']}") from None


def run_serve(args: argparse.Namespace, settings: Any) -> int:
    """``eagle serve``."""
    from deploy.auth import InsecureBindError
    from deploy.serve import serve

    token = None
    if args.token_file is not None:
        try:
            token = SecretStr(args.token_file.read_text(encoding="utf-8").strip())
        except OSError as err:
            raise CommandError(f"--token-file: {err.strerror or err}: {args.token_file}") from None
    _apply(settings.service, host=args.host, port=args.port, token=token, queue_size=args.queue_size)
    if args.no_mllm:
        settings.mllm.enabled = False
    try:
        serve(settings)
    except InsecureBindError as err:
        raise CommandError(str(err)) from None
    return 0


def run_watch(args: argparse.Namespace, settings: Any) -> int:
    """``eagle watch``."""
    from deploy.watch import FolderWatcher, WatcherBusyError
    from eagle.audit import AuditLog, default_audit_path
    from eagle.banks import validate_bank_name

    if args.no_mllm:
        settings.mllm.enabled = False
    _apply(settings.service, watch_poll_s=args.poll)
    validate_bank_name(args.bank)  # a bad name is an EagleError: one line, exit 2 (eagle.cli.main)
    if not args.in_dir.is_dir():
        raise CommandError(f"--in {str(args.in_dir)!r} is not a directory")
    from eagle.pipeline import Pipeline

    pipeline = Pipeline(settings)
    if not pipeline.banks.exists(args.bank):
        raise CommandError(f"no bank named {args.bank!r} in {settings.banks_dir} (build it with `eagle build-bank`)")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    failed: list[str] = []

    def report(outcome: Any) -> None:
        if outcome.status == "failed":
            failed.append(outcome.name)
            print(f"eagle watch: {outcome.name}: failed ({outcome.error_code}); see {outcome.record}", file=sys.stderr)

    with AuditLog(default_audit_path(settings)) as audit:
        watcher = FolderWatcher(
            pipeline,
            args.in_dir,
            args.out_dir,
            args.bank,
            audit=audit,
            max_pixels=settings.max_image_pixels,
            poll_s=settings.service.watch_poll_s,
            truncated_retry_s=settings.service.watch_truncated_retry_s,
            events=settings.service.watch_events,
            batch_size=settings.service.watch_batch_size,
        )
        try:
            watcher.open()
        except (WatcherBusyError, ValueError, NotADirectoryError) as err:
            raise CommandError(str(err)) from None
        try:
            outcomes = watcher.run(stop, once=args.once, on_outcome=report)
        finally:
            watcher.close()
    done = sum(1 for o in outcomes if o.status == "done")
    print(f"eagle watch: {done} inspected, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0
