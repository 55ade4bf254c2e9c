"""``eagle doctor``: what this installation can do, and the exact fix for what it cannot (:mod:`eagle.doctor`).

Exit codes: 0 the configured setup can run (warnings allowed); 4 something it needs is missing
(:data:`EXIT_NOT_RUNNABLE`); 2 configuration errors, as every command.

Example:
    $ eagle doctor
    $ HF_HUB_OFFLINE=1 eagle doctor --json
"""

from __future__ import annotations

import argparse
import json

from eagle.settings import Settings

EXIT_NOT_RUNNABLE = 4
"""Exit code of ``eagle doctor`` when a check the configured setup needs is missing."""


def run_doctor(args: argparse.Namespace, settings: Settings) -> int:
    """Handler of ``eagle doctor``: print the table (or JSON) and exit 0, or 4 when the setup cannot run."""
    from eagle.doctor import run_checks

    report = run_checks(settings, probe_timeout_s=args.timeout)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0 if report.runnable else EXIT_NOT_RUNNABLE


def register(subparsers) -> None:
    """Add the ``doctor`` subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="Check what this installation can do (weights, GPU, bitsandbytes, hub, disk) and how to fix it.",
        description="Check the expert and MLLM weights, the GPU, bitsandbytes, the Hugging Face hub (skipped in "
        "offline mode, HF_HUB_OFFLINE=1) and free disk under the data folder, for the configured setup. Nothing "
        f"is downloaded. Exit code 0: it can run; {EXIT_NOT_RUNNABLE}: something it needs is missing.",
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        help="Seconds the hub reachability probe waits (default: 2; never used in offline mode).",
    )
    parser.set_defaults(func=run_doctor)
