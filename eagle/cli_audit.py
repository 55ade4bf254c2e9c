"""``eagle audit`` and ``eagle audit stats``: read the inspection audit log (:mod:`eagle.audit`).

Every front end (the app, the service, the watcher) writes the same audit log; this command filters it, prints a
table or writes CSV, and summarises it per bank and period.

Examples:
    $ eagle audit --since 24h --bank bolts --decision anomalous --csv anomalies.csv
    $ eagle audit stats --since 7d --per day --csv line3.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eagle.audit import PERIODS, SOURCES
from eagle.errors import CommandError
from eagle.records import EXPERT_DECISIONS, VERDICTS
from eagle.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``audit`` (and its ``stats`` subcommand) to the ``eagle`` parser."""
    audit = subparsers.add_parser(
        "audit",
        help="Show or export the inspection audit log.",
        description="Filter the audit log; print a table or write CSV. Times: ISO 8601 (naive = local time) or "
        "an age such as 30m, 24h, 7d.",
    )
    audit.add_argument("--since", default=None, help="From this time (inclusive).")
    audit.add_argument("--until", default=None, help="Up to this time (exclusive).")
    audit.add_argument("--bank", default=None, help="Only this bank.")
    audit.add_argument("--decision", choices=list(EXPERT_DECISIONS), default=None, help="Expert decision.")
    audit.add_argument("--verdict", choices=list(VERDICTS), default=None, help="Final verdict.")
    audit.add_argument("--source", choices=list(SOURCES), default=None)
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
    stats.add_argument("--per", choices=list(PERIODS), default="all", help="Period of each row (UTC; default all).")
    stats.add_argument("--csv", dest="stats_csv", default=None, help="Write CSV to this file ('-': stdout).")
    stats.add_argument("--json", dest="stats_json", action="store_true", help="Print one JSON array.")
    stats.add_argument("--db", dest="stats_db", type=Path, default=None, help="Audit database.")
    stats.set_defaults(func=run_audit_stats)


def _audit_path(db: Path | None, settings: Settings) -> Path:
    from eagle.audit import default_audit_path

    path = Path(db or default_audit_path(settings))
    if not path.exists():
        raise CommandError(f"no audit log at {path} (nothing inspected yet, or set EAGLE_SERVICE__AUDIT_PATH / --db)")
    return path


def run_audit_stats(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle audit stats``."""
    import json

    from eagle.audit import AuditFilter, AuditLog, format_stats, parse_time, write_stats_csv

    path = _audit_path(args.stats_db, settings)
    try:
        since = parse_time(args.stats_since) if args.stats_since else None
        until = parse_time(args.stats_until) if args.stats_until else None
    except ValueError as err:
        raise CommandError(str(err)) from None
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


def run_audit(args: argparse.Namespace, settings: Settings) -> int:
    """``eagle audit``."""
    from eagle.audit import AuditFilter, AuditLog, format_table, parse_time, write_csv

    path = _audit_path(args.db, settings)
    if args.limit is not None and args.limit < 1:
        raise CommandError("--limit must be at least 1")
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as err:
        raise CommandError(str(err)) from None
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
