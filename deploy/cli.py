"""``eagle serve``, ``eagle watch`` and ``eagle audit``: the edge box from the command line.

Examples:
    $ EAGLE_SERVICE__TOKEN=$(cat /run/secrets/eagle_token) eagle serve --host 0.0.0.0 --no-mllm
    $ eagle watch --in /line3/incoming --out /line3/results --bank bolts
    $ eagle audit --since 24h --bank bolts --decision anomalous --csv anomalies.csv
    $ eagle audit stats --since 7d --per day --csv line3.csv
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``watch`` and ``audit`` to the ``eagle`` parser."""
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

    audit = subparsers.add_parser(
        "audit",
        help="Show or export the inspection audit log.",
        description="Filter the audit log; print a table or write CSV. Times: ISO 8601 (naive = local time) or "
        "an age such as 30m, 24h, 7d.",
    )
    audit.add_argument("--since", default=None, help="From this time (inclusive).")
    audit.add_argument("--until", default=None, help="Up to this time (exclusive).")
    audit.add_argument("--bank", default=None, help="Only this bank.")
    audit.add_argument("--decision", choices=["anomalous", "normal"], default=None, help="Expert decision.")
    audit.add_argument("--verdict", choices=["defect", "no_defect", "unknown"], default=None, help="Final verdict.")
    audit.add_argument("--source", choices=["api", "watch", "app"], default=None)
    audit.add_argument("--status", choices=["ok", "error"], default=None)
    audit.add_argument("--limit", type=int, default=None, help="Only the most recent N rows.")
    audit.add_argument("--csv", dest="csv_path", default=None, help="Write CSV to this file ('-': stdout).")
    audit.add_argument("--db", type=Path, default=None, help="Audit database (default: the configured one).")
    audit.set_defaults(func=run_audit)
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    stats = audit_commands.add_parser(
        "stats",
        help="Line statistics per bank and period: defect and overrule rates, precision/recall, latency.",
        description="Per bank and period: inspections, defect rate, overrule rate, precision/recall against operator "
        "feedback (the operator's verdict as ground truth), expert-vs-MLLM disagreement, latency p50/p90/p99.",
    )
    stats.add_argument("--bank", dest="stats_bank", default=None, help="Only this bank.")
    stats.add_argument("--since", dest="stats_since", default=None, help="From this time (inclusive).")
    stats.add_argument("--until", dest="stats_until", default=None, help="Up to this time (exclusive).")
    stats.add_argument(
        "--per", choices=["all", "day", "week", "month"], default="all", help="Period of each row (UTC; default all)."
    )
    stats.add_argument("--csv", dest="stats_csv", default=None, help="Write CSV to this file ('-': stdout).")
    stats.add_argument("--json", dest="stats_json", action="store_true", help="Print one JSON array.")
    stats.add_argument("--db", dest="stats_db", type=Path, default=None, help="Audit database.")
    stats.set_defaults(func=run_audit_stats)


def _fail(message: str, exit_code: int = 2) -> Exception:
    from eagle.cli import CommandError

    return CommandError(message, exit_code=exit_code)


def _apply(group: Any, **values: Any) -> None:
    """Assign validated overrides onto a settings group; a bad value is one line naming the option."""
    for key, value in values.items():
        if value is None:
            continue
        try:
            setattr(group, key, value)
        except ValidationError as err:
            raise _fail(f"--{key.replace('_', '-')}: {err.errors()[0]['msg']}") from None


def run_serve(args: argparse.Namespace, settings: Any) -> int:
    """``eagle serve``."""
    from deploy.auth import InsecureBindError
    from deploy.serve import serve

    token = None
    if args.token_file is not None:
        try:
            token = SecretStr(args.token_file.read_text(encoding="utf-8").strip())
        except OSError as err:
            raise _fail(f"--token-file: {err.strerror or err}: {args.token_file}") from None
    _apply(settings.service, host=args.host, port=args.port, token=token, queue_size=args.queue_size)
    if args.no_mllm:
        settings.mllm.enabled = False
    try:
        serve(settings)
    except InsecureBindError as err:
        raise _fail(str(err)) from None
    return 0


def run_watch(args: argparse.Namespace, settings: Any) -> int:
    """``eagle watch``."""
    from deploy.watch import FolderWatcher, WatcherBusyError
    from eagle.audit import AuditLog, default_audit_path
    from eagle.banks import BankNameError, validate_bank_name

    if args.no_mllm:
        settings.mllm.enabled = False
    _apply(settings.service, watch_poll_s=args.poll)
    try:
        validate_bank_name(args.bank)
    except BankNameError as err:
        raise _fail(str(err)) from None
    if not args.in_dir.is_dir():
        raise _fail(f"--in {str(args.in_dir)!r} is not a directory")
    from eagle.pipeline import Pipeline

    pipeline = Pipeline(settings)
    if not pipeline.banks.exists(args.bank):
        raise _fail(f"no bank named {args.bank!r} in {settings.banks_dir} (build it with `eagle build-bank`)")
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
        )
        try:
            watcher.open()
        except (WatcherBusyError, ValueError, NotADirectoryError) as err:
            raise _fail(str(err)) from None
        try:
            outcomes = watcher.run(stop, once=args.once, on_outcome=report)
        finally:
            watcher.close()
    done = sum(1 for o in outcomes if o.status == "done")
    print(f"eagle watch: {done} inspected, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def _audit_path(db: Path | None, settings: Any) -> Path:
    from eagle.audit import default_audit_path

    path = Path(db or default_audit_path(settings))
    if not path.exists():
        raise _fail(f"no audit log at {path} (nothing inspected yet, or set EAGLE_SERVICE__AUDIT_PATH / --db)")
    return path


def run_audit_stats(args: argparse.Namespace, settings: Any) -> int:
    """``eagle audit stats``."""
    import json

    from eagle.audit import AuditFilter, AuditLog, format_stats, parse_time, write_stats_csv

    path = _audit_path(args.stats_db, settings)
    try:
        since = parse_time(args.stats_since) if args.stats_since else None
        until = parse_time(args.stats_until) if args.stats_until else None
    except ValueError as err:
        raise _fail(str(err)) from None
    with AuditLog(path) as log:
        stats = log.stats(AuditFilter(since=since, until=until, bank=args.stats_bank), per=args.per)
    if args.stats_csv == "-":
        write_stats_csv(stats, sys.stdout)
    elif args.stats_csv:
        with open(args.stats_csv, "w", encoding="utf-8", newline="") as handle:
            write_stats_csv(stats, handle)
        print(f"eagle audit stats: {len(stats)} rows written to {args.stats_csv}", file=sys.stderr)
    if args.stats_json:
        print(json.dumps(stats))
    elif not args.stats_csv:
        for line in format_stats(stats):
            print(line)
        print(f"({len(stats)} bank/period rows)", file=sys.stderr)
    return 0


def run_audit(args: argparse.Namespace, settings: Any) -> int:
    """``eagle audit``."""
    from eagle.audit import AuditFilter, AuditLog, format_table, parse_time, write_csv

    path = _audit_path(args.db, settings)
    if args.limit is not None and args.limit < 1:
        raise _fail("--limit must be at least 1")
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as err:
        raise _fail(str(err)) from None
    where = AuditFilter(
        since=since,
        until=until,
        bank=args.bank,
        decision=args.decision,
        verdict=args.verdict,
        source=args.source,
        status=args.status,
        limit=args.limit,
    )
    with AuditLog(path) as log:
        rows = log.query(where)
    if args.csv_path == "-":
        write_csv(rows, sys.stdout)
    elif args.csv_path:
        with open(args.csv_path, "w", encoding="utf-8", newline="") as handle:
            write_csv(rows, handle)
        print(f"eagle audit: {len(rows)} rows written to {args.csv_path}", file=sys.stderr)
    else:
        for line in format_table(rows):
            print(line)
        print(f"({len(rows)} rows)", file=sys.stderr)
    return 0
